"""`pdctl bench`: options in, tables out; the work is in the modules beside this one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pdctl.auth import API_KEY_HELP
from pdctl.bench import compare, views
from pdctl.bench.run import BenchOutcome, Target, execute, prepare, target_of_cluster, target_of_url, write_json
from pdctl.bench.workload import SCENARIOS, WorkloadSpec, parse_extra_body, parse_goodput, parse_priority_mix
from pdctl.errors import ClusterError, UsageError
from pdctl.profile import load_profile
from pdctl.safetext import cell
from pdctl.state import ClusterDir, NoCluster, state_root

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

_WORKLOAD = "Workload"
_LOAD = "Load"
_REPORT = "Report"
_AB = "A/B"


def bench(
    profile: Annotated[
        Path | None, typer.Argument(help="the cluster's profile (its running cluster is measured)", show_default=False)
    ] = None,
    url: Annotated[str | None, typer.Option(help="any OpenAI-compatible server instead of a pdctl cluster")] = None,
    model: Annotated[str | None, typer.Option(help="the model to ask for (default: the first served)")] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="the model's directory, for its tokenizer (default: the served model's)")
    ] = None,
    cluster: Annotated[str | None, typer.Option(help="the running cluster (the only one when omitted)")] = None,
    engine: Annotated[
        list[str] | None, typer.Option(help="with --url: an engine URL whose /metrics to read (repeatable)")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(help="where cluster state lives")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help=API_KEY_HELP, show_default=False)] = None,
    scenario: Annotated[
        str | None, typer.Option(help=f"preset workload: {', '.join(SCENARIOS)}", rich_help_panel=_WORKLOAD)
    ] = None,
    num_prompts: Annotated[int, typer.Option("--num-prompts", "-n", rich_help_panel=_WORKLOAD)] = 100,
    input_len: Annotated[int | None, typer.Option(help="tokens (default 1024)", rich_help_panel=_WORKLOAD)] = None,
    output_len: Annotated[int | None, typer.Option(help="tokens (default 128)", rich_help_panel=_WORKLOAD)] = None,
    range_ratio: Annotated[
        float | None, typer.Option(help="lengths uniform in len x [1-r, 1+r]", rich_help_panel=_WORKLOAD)
    ] = None,
    prefix_groups: Annotated[int, typer.Option(help="distinct shared prefixes", rich_help_panel=_WORKLOAD)] = 0,
    prefix_len: Annotated[int, typer.Option(help="tokens of each shared prefix", rich_help_panel=_WORKLOAD)] = 0,
    trace: Annotated[
        Path | None, typer.Option(help="replay a JSONL or Mooncake trace", rich_help_panel=_WORKLOAD)
    ] = None,
    trace_format: Annotated[str, typer.Option(help="auto, jsonl, mooncake", rich_help_panel=_WORKLOAD)] = "auto",
    seed: Annotated[int, typer.Option(rich_help_panel=_WORKLOAD)] = 0,
    rate: Annotated[float, typer.Option(help="requests/s (inf: all at once)", rich_help_panel=_LOAD)] = math.inf,
    burstiness: Annotated[float, typer.Option(help="gamma shape; 1 is Poisson", rich_help_panel=_LOAD)] = 1.0,
    concurrency: Annotated[int | None, typer.Option(help="most requests in flight", rich_help_panel=_LOAD)] = None,
    priority_mix: Annotated[
        str | None, typer.Option(help="PRIORITY:WEIGHT,... (e.g. 0:1,2:3)", rich_help_panel=_LOAD)
    ] = None,
    deadline_ms: Annotated[
        float | None, typer.Option(help="slo_deadline_ms of each request", rich_help_panel=_LOAD)
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="seconds before a request counts as timed out", rich_help_panel=_LOAD)
    ] = 600.0,
    extra_body: Annotated[
        str | None,
        typer.Option(
            help="JSON object merged into every request body, as vllm bench serve's --extra-body",
            rich_help_panel=_LOAD,
        ),
    ] = None,
    goodput: Annotated[
        list[str] | None, typer.Option(help="SLOs for goodput: ttft:MS tpot:MS e2el:MS", rich_help_panel=_REPORT)
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="write the results here", rich_help_panel=_REPORT)
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="charts: .png (matplotlib) or .html", rich_help_panel=_REPORT)
    ] = None,
    compare_layouts: Annotated[
        bool,
        typer.Option(
            "--compare", help="PD layout against colocated (all HYBRID), each brought up in turn", rich_help_panel=_AB
        ),
    ] = False,
    policies: Annotated[
        str | None,
        typer.Option(help="routing policies to compare, e.g. threshold,adaptive,always,never", rich_help_panel=_AB),
    ] = None,
    sweep: Annotated[
        str | None, typer.Option(help="rate:1,2,4 or concurrency:1,8,64: find the knee", rich_help_panel=_AB)
    ] = None,
    sweep_attainment: Annotated[
        float, typer.Option(help="share of requests meeting --goodput for a load to pass", rich_help_panel=_AB)
    ] = 0.9,
) -> None:
    """Load a server as its users would and report vllm bench serve's metrics, with the servers' own figures."""
    spec = WorkloadSpec(
        scenario=scenario,
        num_prompts=num_prompts,
        input_len=input_len,
        output_len=output_len,
        range_ratio=range_ratio,
        prefix_groups=prefix_groups,
        prefix_len=prefix_len,
        rate=rate,
        burstiness=burstiness,
        priority_mix=parse_priority_mix(priority_mix or ""),
        deadline_ms=deadline_ms,
        trace=trace,
        trace_format=trace_format,
        seed=seed,
    )
    slos = parse_goodput(goodput or [])
    settings = compare.RunSettings(
        spec, concurrency, slos, timeout, str(tokenizer) if tokenizer else None, parse_extra_body(extra_body)
    )
    if compare_layouts or policies:
        if profile is None:
            raise UsageError("--compare and --policies bring layouts up from a profile: give PROFILE")
        variants = compare.policy_variants(policies) if policies else compare.LAYOUTS
        runs = compare.run_variants(profile, variants, settings, state_root(state_dir), _runner(), err)
        title = "routing policies, same PD layout" if policies else "PD against colocated, same devices"
        out.print(views.comparison_table(runs, title + _sim_label(runs)))
        if not policies and (saved := compare.record_cost_comparison(profile, runs, settings, state_root(state_dir))):
            err.print(f"cost comparison stored in {saved}: `pdctl status` and PDMetrics show it")
        _write(json_file, {"runs": dict(runs)})
        return
    target = _target(profile, url, model, cluster, state_dir, api_key)
    target.engines.update({e.rstrip("/"): e.rstrip("/") for e in engine or []})
    if sweep:
        runs, knee = compare.run_sweep(target, compare.parse_sweep(sweep), settings, sweep_attainment, _runner())
        out.print(views.comparison_table(runs, f"sweep on {target.label or target.url}"))
        out.print(compare.knee_text(knee, slos))
        _write(json_file, {"runs": dict(runs), "knee": knee})
        return
    outcome = _runner()(target, settings)
    data = outcome.as_json()
    out.print(views.summary_table(data, f"pdctl bench: {target.label or target.url}"))
    _write(json_file, data)
    if plot:
        from pdctl.bench import plot as plotting

        written = plotting.write(plot, data, outcome.results)
        err.print(f"wrote {written}")


def _runner():
    def run(target: Target, settings: compare.RunSettings) -> BenchOutcome:
        info, workload, tokenizer_name = prepare(target, settings.spec, settings.tokenizer)
        for note in workload.notes:
            err.print(cell(f"note: {note}"))
        err.print(cell(f"{target.label or target.url}: {workload.description}; prompts: {tokenizer_name}"))
        bar = views.progress_bar(err)
        with bar:
            update = views.progress_updater(bar, "requests", len(workload.requests))
            return execute(
                target,
                info,
                workload,
                tokenizer_name,
                settings.concurrency,
                settings.goodput,
                settings.timeout_s,
                update,
                settings.extra_body,
            )

    return run


def _target(
    profile: Path | None,
    url: str | None,
    model: str | None,
    cluster: str | None,
    state_dir: Path | None,
    api_key: str | None,
) -> Target:
    if url:
        if profile is not None:
            raise UsageError("give PROFILE or --url, not both")
        return target_of_url(url, model, api_key)
    name = cluster or (load_profile(profile).name if profile else None)
    try:
        target = target_of_cluster(ClusterDir.find(state_root(state_dir), name), api_key)
    except NoCluster as nothing:
        raise UsageError(f"no cluster is running (state in {nothing.root}): `pdctl up PROFILE`, or --url") from None
    except ClusterError as error:
        raise UsageError(str(error)) from None
    target.model = model or target.model
    return target


def _sim_label(runs: list[tuple[str, dict[str, Any]]]) -> str:
    return " (sim engine: an emulator, not vLLM)" if any(r.get("pdctl", {}).get("sim") for _, r in runs) else ""


def _write(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        write_json(path, data)
        err.print(f"wrote {path}")
