"""mindeye-demo: the main job on the built-in default, a live decoding session on the synthetic world.

1. Generates the world (or reuses it) and prints its summary.
2. Trains a model for one subject on all but its last session (`mindeye-train`), or reuses it.
3. Starts the realtime service (`mindeye-realtime`) with its live viewer.
4. Replays the held-out session over the wire, as a scanner would (`mindeye-replay`).
5. Stops the service and prints what it decoded and how fast.

The stages run as the commands a researcher would run, each in its own process; this script only
sequences them and reads their output files.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from mindeye.cli import command


def train_model(cfg: DictConfig, root: Path, train_sessions: list[int]) -> Path:
    """The subject's checkpoint: trained once, then reused."""
    model_dir = Path(cfg.train.out_dir)
    checkpoint = model_dir / "checkpoint"
    if (checkpoint / "config.json").is_file():
        print(f"model: reusing {checkpoint}")
        return checkpoint
    print(f"model: training subj{cfg.subject:02d} on sessions {train_sessions} ({cfg.train.epochs} epochs) "
          f"-> {model_dir}")
    command = [sys.executable, "-m", "offline_training.train", "mode=scratch", f"subjects=[{cfg.subject}]",
               f"train_sessions=[{','.join(map(str, train_sessions))}]", f"data.root={root}", f"out_dir={model_dir}",
               f"train.epochs={cfg.train.epochs}", f"train.lr={cfg.train.lr}", f"train.eval.every={cfg.train.epochs}",
               f"progress={str(cfg.progress).lower()}", "cpu=true"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return checkpoint


def start_service(cfg: DictConfig, root: Path, checkpoint: Path, out_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "realtime.cli", f"checkpoint={checkpoint}", f"data.root={root}",
               f"out_dir={out_dir}", f"endpoints.volumes={cfg.service.volumes}",
               f"endpoints.results={cfg.service.results}", f"viewer.port={cfg.service.viewer_port}",
               "log_level=INFO"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        log = out_dir / "service.log"
        if log.is_file() and "listening for volumes" in log.read_text():
            return process
        if process.poll() is not None:
            raise RuntimeError(f"the realtime service exited:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the realtime service did not start listening within 5 minutes")


def report(out_dir: Path, shared_images: set[int]) -> None:
    """Live top-1 retrieval (the candidates are the shared test images) and latency, from the service's files."""
    results = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    shown_shared = [r for r in results if r["top_k"] and r["image_id"] in shared_images]
    hits = sum(r["top_k"][0]["image_id"] == r["image_id"] for r in shown_shared)
    skipped = sum("skipped" in r["flags"] for r in results)
    reconstructed = sum("image_png" in r["frames"] for r in results)
    print(f"live: {len(results)} trials published ({skipped} skipped); top-1 among the {len(shared_images)} shared "
          f"images, over the {len(shown_shared)} trials that showed one: {hits / max(1, len(shown_shared)):.1%} "
          f"(chance {1 / len(shared_images):.1%})")
    print(f"reconstructions: {reconstructed} of the {len(results) - skipped} decoded trials (in the viewer beside the "
          f"seen image)")
    latency = json.loads((out_dir / "latency.json").read_text())
    end_to_end = latency["stages"].get("end_to_end")
    if end_to_end:
        print(f"latency, last volume of a trial's window -> result: p50 {end_to_end['p50']:.1f} ms, "
              f"p95 {end_to_end['p95']:.1f} ms, max {end_to_end['max']:.1f} ms")
    print(f"files: {out_dir} (results.jsonl, latency.csv/json/png, journal.mej, betas/)")


@command("demo", "mindeye-demo")
def main(cfg: DictConfig) -> None:
    # imported here, not at the top, so that --help answers without loading them
    from mindeye.nsd import ExpDesign, NSDLayout
    from simulators.replay.sender import replay
    from simulators.replay.sources import NSDSource
    from simulators.world.generate import format_summary, generate_world
    from simulators.world.learnability import check_learnability

    root = Path(cfg.out_dir)
    summary = generate_world(cfg.world, root, overwrite=cfg.overwrite, progress=cfg.progress)
    print(format_summary(summary, root))
    print(" ", check_learnability(root, cfg.subject))

    n_sessions = cfg.world.sessions_per_subject[cfg.subject - 1]
    live_session = cfg.live_session or n_sessions
    checkpoint = train_model(cfg, root, [s for s in range(1, n_sessions + 1) if s != live_session])
    out_dir = Path(cfg.service.out_dir)
    service = start_service(cfg, root, checkpoint, out_dir)
    try:
        print(f"live viewer: http://127.0.0.1:{cfg.service.viewer_port}/  (open it in a browser)")
        runs = list(cfg.runs or range(1, cfg.world.session.runs + 1))
        print(f"replaying session {live_session} of subj{cfg.subject:02d} (runs {runs}, held out from training) at "
              f"{cfg.speed}x the scanner's pace")
        print(replay(NSDSource(NSDLayout(root), cfg.subject, live_session, runs), cfg.service.volumes,
                     speed=cfg.speed).format())
        time.sleep(cfg.hold_s)
    finally:
        service.send_signal(signal.SIGINT)  # the service finishes its queue and writes the latency report
        service.wait(60)
    report(out_dir, set(ExpDesign.read(NSDLayout(root).expdesign()).shared_images.tolist()))


if __name__ == "__main__":
    main()
