"""One OpenAI-compatible server as an engine: the client (``client``), the body it sends
(``body``), what it reads back (``chunks``, ``answers``), its timers (``silence``) and how its
failures are named (``failures``)."""
