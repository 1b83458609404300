"""The fleet benchmark's numbers: one ``Row`` per router x workload x N, from the client's samples
and the replicas' /metrics before and after; written as markdown, JSON and a plot."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.fleet.client import Sample

RESULTS = Path(__file__).parents[1] / "results"
NAN = float("nan")


@dataclass(slots=True)
class ReplicaStat:
    replica: str
    share: float  # of the requests
    queries: float  # prefix-cache queries and hits, in tokens, over the run
    hits: float


@dataclass(slots=True)
class Row:
    router: str
    workload: str
    replicas: int
    requests: int = 0
    errors: int = 0
    hit_rate: float = NAN  # prefix-cache hits / queries, in tokens, over all replicas
    ttft_p50_ms: float = NAN
    ttft_p99_ms: float = NAN
    output_tok_s: float = NAN
    max_share: float = NAN  # of the requests, the most loaded replica's
    min_share: float = NAN
    seconds: float = NAN
    per_replica: list[ReplicaStat] = field(default_factory=list)
    error: str | None = None  # why the run did not happen
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def max_over_mean(self) -> float:
        return self.max_share * self.replicas


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else NAN


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def row(
    router: str,
    workload: str,
    samples: Sequence[Sample],
    seconds: float,
    replica_ids: Sequence[str],
    before: Sequence[dict[str, float]],
    after: Sequence[dict[str, float]],
) -> Row:
    ok = [s for s in samples if s.ok]
    served = Counter(s.replica for s in samples if s.replica is not None)
    if not served:  # a router that relays neither header nor fingerprint: the replicas' counts
        for rid, b, a in zip(replica_ids, before, after, strict=True):
            served[rid] = int(_delta(b, a, "vllm:request_success_total"))
    total = sum(served.values()) or 1
    per = [
        ReplicaStat(
            rid,
            served[rid] / total,
            _delta(b, a, "vllm:prefix_cache_queries_total"),
            _delta(b, a, "vllm:prefix_cache_hits_total"),
        )
        for rid, b, a in zip(replica_ids, before, after, strict=True)
    ]
    queries = sum(p.queries for p in per)
    shares = [p.share for p in per]
    return Row(
        router,
        workload,
        len(replica_ids),
        requests=len(samples),
        errors=len(samples) - len(ok),
        hit_rate=sum(p.hits for p in per) / queries if queries else NAN,
        ttft_p50_ms=pct([s.ttft_s for s in ok], 0.5) * 1e3,
        ttft_p99_ms=pct([s.ttft_s for s in ok], 0.99) * 1e3,
        output_tok_s=sum(s.tokens for s in ok) / seconds,
        max_share=max(shares),
        min_share=min(shares),
        seconds=seconds,
        per_replica=per,
    )


def failed(router: str, workload: str, replicas: int, error: str, logs: dict[str, str]) -> Row:
    return Row(router, workload, replicas, error=error, logs=logs)


def line(r: Row) -> str:
    head = f"{r.router:30s} {r.workload:11s} N={r.replicas}"
    if r.error:
        return f"{head} FAILED: {r.error}"
    return (
        f"{head} hit {r.hit_rate:6.1%} TTFT p50 {r.ttft_p50_ms:7.0f} ms p99 {r.ttft_p99_ms:7.0f} ms"
        f" {r.output_tok_s:6.0f} tok/s shares {r.max_share:.2f}/{r.min_share:.2f}"
        f" err {r.errors}/{r.requests} ({r.seconds:.0f} s)"
    )


def markdown(rows: Sequence[Row], setup: str) -> str:
    lines = [
        "# Fleet benchmark: routers in front of simulated vLLM replicas",
        "",
        setup,
        "",
        "| workload | N | router | hit rate | TTFT p50 | TTFT p99 | output tok/s | "
        "max share (xmean) | min share | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted((r for r in rows if not r.error), key=lambda r: (r.workload, r.replicas)):
        lines.append(
            f"| {r.workload} | {r.replicas} | {r.router} | {r.hit_rate:.1%} | "
            f"{r.ttft_p50_ms:.0f} ms | {r.ttft_p99_ms:.0f} ms | {r.output_tok_s:.0f} | "
            f"{r.max_share:.2f} ({r.max_over_mean:.2f}x) | {r.min_share:.2f} | "
            f"{r.errors}/{r.requests} |"
        )
    failures = [r for r in rows if r.error]
    if failures:
        lines += ["", "## Runs that did not happen", ""]
        lines += [f"- {r.router}, {r.workload}, N={r.replicas}: {r.error}" for r in failures]
    return "\n".join(lines) + "\n"


def setup_text(args: argparse.Namespace) -> str:
    sim = " ".join(args.sim) or "defaults"
    return (
        f"Workloads {', '.join(args.workloads)} (users: {args.users or 'default'}, seed "
        f"{args.seed or 0}); replicas' model: {sim}; time scale {args.time_scale:g}. Every "
        f"router x workload x N on fresh replicas (cold caches) and a fresh router; "
        f"{os.cpu_count()} CPU cores shared by the replicas, the router and the client. Hit "
        "rate: prefix-cache hit tokens / queried prompt tokens over all replicas (their "
        "/metrics). Share: the fraction of the requests a replica served."
    )


def write(rows: Sequence[Row], args: argparse.Namespace, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, setup_text(args))
    (out / f"{name}.md").write_text(text)
    data = {"setup": setup_text(args), "rows": [_clean(asdict(r)) for r in rows]}
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    plot([r for r in rows if not r.error], out / f"{name}.png")
    print(text)


def _clean(value: object) -> object:
    """NaN (a run that did not happen) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in rows))
    if not workloads:
        return
    metrics = [
        ("hit_rate", "prefix-cache hit rate"),
        ("ttft_p99_ms", "TTFT p99 (ms)"),
        ("max_over_mean", "most loaded replica (x mean)"),
    ]
    fig, axes = plt.subplots(
        len(metrics), len(workloads), figsize=(5 * len(workloads), 9), squeeze=False
    )
    routers = list(dict.fromkeys(r.router for r in rows))
    counts = sorted({r.replicas for r in rows})
    width = 0.8 / len(counts)
    for col, workload in enumerate(workloads):
        for line_no, (attr, label) in enumerate(metrics):
            axis = axes[line_no][col]
            for k, count in enumerate(counts):
                mine = {r.router: r for r in rows if r.workload == workload and r.replicas == count}
                values = [getattr(mine[n], attr) if n in mine else NAN for n in routers]
                ys = [i + k * width for i in range(len(routers))]
                axis.barh(ys, values, height=width, label=f"N={count}")
            axis.set_yticks([i + width * (len(counts) - 1) / 2 for i in range(len(routers))])
            axis.set_yticklabels(routers, fontsize=7)
            axis.set_xlabel(label)
            if line_no == 0:
                axis.set_title(workload)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
