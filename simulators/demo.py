"""mindeye-demo: the main job on the built-in default, a live decoding session on the synthetic world.

1. Generates the world (or reuses it) and prints its summary.
2. Trains a model for one subject on all but its last session (`mindeye-train`), or reuses it, and
   exports it with the world's generator into a bundle (`mindeye-export`; plain eager by default).
3. Starts the realtime service (`mindeye-realtime`) on that bundle, with its live viewer.
4. Replays the held-out session over the wire, as a scanner would (`mindeye-replay`).
5. Prints what it decoded and how fast, and keeps the service and viewer up until Ctrl-C
   (`stay_up=false` stops them at once, for tests and CI).

The stages run as the commands a researcher would run, each in its own process; this script only
sequences them and reads their output files.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from mindeye.cli import command
from mindeye.errors import ServiceUnavailable


def train_model(cfg: DictConfig, root: Path, train_sessions: list[int]) -> Path:
    """The subject's checkpoint: trained once, then reused."""
    model_dir = Path(cfg.train.out_dir)
    checkpoint = model_dir / "checkpoint"
    if (checkpoint / "config.json").is_file():
        print(f"model: reusing {checkpoint}")
        return checkpoint
    print(f"model: training subj{cfg.subject:02d} ({cfg.train.model}) on sessions {train_sessions} "
          f"({cfg.train.epochs} epochs) -> {model_dir}")
    command = [sys.executable, "-m", "offline_training.train", f"model={cfg.train.model}", "mode=scratch",
               f"subjects=[{cfg.subject}]",
               f"train_sessions=[{','.join(map(str, train_sessions))}]", f"data.root={root}", f"out_dir={model_dir}",
               f"train.epochs={cfg.train.epochs}", f"train.lr={cfg.train.lr}", f"train.eval.every={cfg.train.epochs}",
               f"progress={str(cfg.progress).lower()}", "cpu=true"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return checkpoint


def export_bundle(cfg: DictConfig, root: Path, checkpoint: Path) -> Path:
    """The checkpoint's export bundle (`mindeye-export`, backend `export.backend`): made once per checkpoint,
    then reused while its recorded weights are the checkpoint's."""
    bundle = Path(cfg.export.out_dir)
    manifest = bundle / "manifest.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        weights = json.loads((checkpoint / "config.json").read_text())["weights_sha256"]
        if recorded["checkpoint"]["weights"]["sha256"] == weights and recorded["backend"] == cfg.export.backend:
            print(f"bundle: reusing {bundle}")
            return bundle
    print(f"bundle: exporting {checkpoint} for {cfg.export.backend} -> {bundle}")
    command = [sys.executable, "-m", "export.cli", f"checkpoint={checkpoint}", f"out_dir={bundle}", "overwrite=true",
               f"backend={cfg.export.backend}", f"data.root={root}", f"generator_dir={cfg.export.generator}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return bundle


def start_service(cfg: DictConfig, root: Path, bundle: Path, out_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "realtime.cli", f"bundle={bundle}", f"data.root={root}",
               f"out_dir={out_dir}", f"endpoints.volumes={cfg.service.volumes}",
               f"endpoints.results={cfg.service.results}", f"viewer.port={cfg.service.viewer_port}",
               f"decode.candidates={override(cfg.candidates)}",
               "log_level=INFO"]
    out_dir.mkdir(parents=True, exist_ok=True)
    # a file, not a pipe: a pipe nobody reads fills up, and then the service blocks on its next warning
    with open(out_dir / "service.stderr", "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        log = out_dir / "service.log"
        if log.is_file() and "listening for volumes" in log.read_text():
            return process
        if process.poll() is not None:
            said = [line for line in re.split(r"[\r\n]+", (out_dir / "service.stderr").read_text()) if line.strip()]
            raise ServiceUnavailable(f"the realtime service exited with code {process.returncode}: "
                                     f"{said[-1] if said else 'nothing said'} (log: {out_dir / 'service.log'})")
        time.sleep(0.2)
    process.kill()
    raise ServiceUnavailable(f"the realtime service did not start listening within 5 minutes (log: "
                             f"{out_dir / 'service.log'})")


def wait_for_results(service: subprocess.Popen, out_dir: Path, n_trials: int, timeout_s: float = 600) -> None:
    """Until the service has published a result for each of the `n_trials` replayed trials: the replay
    ends when its volumes are acked, and decoding may still be behind."""
    path = out_dir / "results.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and service.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= n_trials:
            return
        time.sleep(0.2)
    print(f"warning: the service published fewer than the {n_trials} replayed trials' results", file=sys.stderr)


class CountingSource:
    """A replay source that counts the trials its runs announce: each gets one result."""

    def __init__(self, source):
        self.source, self.trials = source, set()

    def runs(self):
        from mindeye.protocol import Events

        for plan in self.source.runs():
            self.trials.update((item.message.session, item.message.run, event.trial) for item in plan
                               if isinstance(item.message, Events) for event in item.message.events)
            yield plan


def report(out_dir: Path, n_candidates: int) -> None:
    """Live top-1 retrieval (realtime.hits's definition) and latency, from the files the service writes as it goes."""
    from realtime.hits import Top1Tally, record_hit
    from realtime.latency import LATENCY_CSV, read_latency_csv, summarize

    results = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    tally = Top1Tally()
    for result in results:
        tally.add(record_hit(result))
    skipped = sum("skipped" in r["flags"] for r in results)
    reconstructed = sum("image_png" in r["frames"] for r in results)
    unknown = sum("image_is_candidate" not in r for r in results)  # from a service older than the field
    older = f"; {unknown} older results do not say whether their image was a candidate: not counted" if unknown else ""
    print(f"live: {len(results)} trials published ({skipped} skipped); top-1 retrieval among {n_candidates} candidate "
          f"images: {tally.format()}; chance {1 / n_candidates:.1%}{older}")
    print(f"reconstructions: {reconstructed} of the {len(results) - skipped} decoded trials (in the viewer beside the "
          f"seen image)")
    end_to_end = summarize(read_latency_csv(out_dir / LATENCY_CSV)).stages.get("end_to_end")
    if end_to_end:
        print(f"latency, last volume of a trial's window -> result: p50 {end_to_end['p50']:.1f} ms, "
              f"p95 {end_to_end['p95']:.1f} ms, max {end_to_end['max']:.1f} ms")


def banner(*lines: str) -> None:
    rule = "=" * max(len(line) for line in lines)
    print("\n".join(["", rule, *lines, rule, ""]), flush=True)


def override(value) -> str:
    """A config value as a key=value override: a list as [a,b]."""
    return value if isinstance(value, str) else f"[{','.join(map(str, value))}]"


@command("demo", "mindeye-demo")
def main(cfg: DictConfig) -> None:
    # imported here, not at the top, so that --help answers without loading them
    from mindeye.nsd import NSDLayout, subject_name
    from realtime.backends import candidate_image_ids
    from simulators.replay.sender import replay
    from simulators.replay.sources import NSDSource
    from simulators.world.generate import format_summary, generate_world
    from simulators.world.learnability import check_learnability

    url = f"http://127.0.0.1:{cfg.service.viewer_port}/"
    print(f"mindeye-demo: the live viewer will be at {url} once the model is ready", flush=True)
    stage_s: dict[str, float] = {}
    started = time.monotonic()
    root = Path(cfg.out_dir)
    summary = generate_world(cfg.world, root, overwrite=cfg.overwrite, progress=cfg.progress)
    print(format_summary(summary, root))
    print(" ", check_learnability(root, cfg.subject))
    stage_s["world"] = time.monotonic() - started
    print(f"stage world: {stage_s['world']:.1f} s", flush=True)

    started = time.monotonic()
    n_sessions = cfg.world.sessions_per_subject[cfg.subject - 1]
    live_session = cfg.live_session or n_sessions
    checkpoint = train_model(cfg, root, [s for s in range(1, n_sessions + 1) if s != live_session])
    stage_s["training"] = time.monotonic() - started
    print(f"stage training: {stage_s['training']:.1f} s", flush=True)

    started = time.monotonic()
    bundle = export_bundle(cfg, root, checkpoint)
    stage_s["export"] = time.monotonic() - started
    print(f"stage export: {stage_s['export']:.1f} s", flush=True)

    started = time.monotonic()
    out_dir = Path(cfg.service.out_dir)
    service = start_service(cfg, root, bundle, out_dir)
    try:
        banner(f"  live viewer: {url}   (open it in a browser)")
        runs = list(cfg.runs or range(1, cfg.world.session.runs + 1))
        pace = "as fast as the service takes them" if str(cfg.speed) == "max" else f"{cfg.speed}x the scanner's pace"
        print(f"replaying session {live_session} of subj{cfg.subject:02d} (runs {runs}, held out from training) at "
              f"{pace}")
        source = CountingSource(NSDSource(NSDLayout(root), cfg.subject, live_session, runs))
        print(replay(source, cfg.service.volumes, speed=cfg.speed).format())
        wait_for_results(service, out_dir, len(source.trials))
        stage_s["live"] = time.monotonic() - started
        print(f"stage live: {stage_s['live']:.1f} s (service start, replay, last result)")
        candidates = candidate_image_ids(root, cfg.candidates, [subject_name(cfg.subject)])
        report(out_dir, len(candidates))
        print("stages: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in stage_s.items()))
        if cfg.stay_up:
            banner(f"  live viewer: {url}   (still up: the results stay there)",
                   "  Ctrl-C stops the service and the viewer")
            # Ctrl-C must stop it even when started from a script that ignores SIGINT (a background job)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                while service.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:  # the terminal's Ctrl-C reaches the service too: it stops by itself
                pass
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGINT)  # the service finishes its queue and writes the latency report
        try:
            service.wait(60)
        except subprocess.TimeoutExpired:
            service.kill()
            raise ServiceUnavailable(f"the realtime service did not stop within 60 s of Ctrl-C and was killed "
                                     f"(log: {out_dir / 'service.log'})") from None
    print(f"files: {out_dir} (results.jsonl, latency.csv/json/png, journal.mej, betas/)")


if __name__ == "__main__":
    main()
