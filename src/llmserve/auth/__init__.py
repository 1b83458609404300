"""Who is asking: the principal a request runs as."""
