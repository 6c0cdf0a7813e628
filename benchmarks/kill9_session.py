"""kill -9 at random points across a session, restart each time: is every trial published exactly once
across the processes, are the betas those of an uninterrupted run, and does a subscriber that stayed
connected receive every trial?

Issue 9. Two sessions go through the realtime service, each a child process (`python -m realtime.cli`
on the tiny world, `benchmarks/soak.py --serve` on the NSD-size source of soak.py), on the same
out_dir and ports for all its lives:

- the reference: the session replayed once, nothing killed;
- the test: at --kills random points (volumes sent, drawn uniformly over the session, plus up to a
  TR of delay) the service gets SIGKILL; it is restarted on the same out_dir and ports (it resumes
  from its journal), and the replayer, killed too, is restarted and resends from the start of the
  first run the service has not finished (a restarted sender: what was already accepted is acked
  `duplicate`).

A SUB subscriber (mindeye.protocol.result_subscriber) is connected to the results port for the
whole of each session, across the restarts, and counts every result it receives. At the end:
results.jsonl holds each image trial exactly once; betas/<session>_run-NN.npz equal the reference's
bit for bit (or within 1e-6); the subscriber received every trial. Missed results are put down to
their cause: published with the flag `recovered` by a restarted service (before the subscriber's
reconnection reached it), or published in the last second before a kill (still in the killed
process's send queue).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/kill9_session.py                  # 20 kills, 3 tiny-world runs
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/kill9_session.py --kills 5 --runs 1
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/kill9_session.py --source nsd-size --runs 2 --volumes 120
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import (NSD_VOLUMES, REPO, NSDSizeSource, Report, command_line, free_port_pair, machine_lines,  # noqa: E402
                  make_checkpoint, make_roi, read_results, service_command, start_service, stop_service,
                  wait_listening)
from simulators.world.untrained import untrained_checkpoint  # noqa: E402

SUBJECT = 1


# ---- the session ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionSpec:
    """What is replayed and how the service is started; picklable, for the sender process."""

    source: str  # "world" | "nsd-size"
    runs: tuple[int, ...]
    work_dir: Path  # the checkpoint (and, nsd-size, the ROI)
    data_root: Path | None = None  # world
    session: int = 1  # world
    volumes: int = NSD_VOLUMES  # nsd-size
    seed: int = 0
    prior_steps: int = 2
    fsync: str = "always"

    def replay_source(self, runs: tuple[int, ...]):
        if self.source == "world":
            from mindeye.nsd import NSDLayout
            from simulators.replay import NSDSource

            return NSDSource(NSDLayout(self.data_root), SUBJECT, self.session, list(runs))
        from mindeye.nsd import read_roi

        return NSDSizeSource(read_roi(self.work_dir / "roi.nii.gz"), tuple(runs), self.volumes, self.seed)

    def session_id(self) -> str:
        return f"subj01-nsd{self.session:02d}" if self.source == "world" else NSDSizeSource.session

    def trials(self) -> dict[int, set[int]]:
        """Run -> the image trials the service publishes a result for (blank trials get none)."""
        if self.source == "world":
            from mindeye.nsd import NSDLayout, read_design, read_timeseries
            from simulators.replay import design_events

            layout = NSDLayout(self.data_root)
            trials = {}
            for run in self.runs:
                tr_s = read_timeseries(layout.timeseries(SUBJECT, self.session, run)).tr
                trials[run] = {e.trial for e in design_events(read_design(layout.design(SUBJECT, self.session, run)),
                                                               tr_s)}
            return trials
        return {run: {e.trial for e in NSDSizeSource(None, (), self.volumes, self.seed).events(run)
                      if e.label != "blank"} for run in self.runs}

    def n_volumes(self) -> dict[int, int]:
        if self.source == "world":
            from mindeye.nsd import NSDLayout, read_timeseries

            layout = NSDLayout(self.data_root)
            return {run: read_timeseries(layout.timeseries(SUBJECT, self.session, run)).n_volumes for run in self.runs}
        return {run: self.volumes for run in self.runs}

    def tr_s(self) -> float:
        if self.source == "world":
            from mindeye.nsd import NSDLayout, read_timeseries

            return read_timeseries(NSDLayout(self.data_root).timeseries(SUBJECT, self.session, self.runs[0])).tr
        return 4.0 / 3.0

    def service_command(self, out_dir: Path, port: int) -> list[str]:
        if self.source == "world":
            return [sys.executable, "-m", "realtime.cli", f"checkpoint={self.work_dir / 'checkpoint'}",
                    f"data.root={self.data_root}", f"out_dir={out_dir}", f"endpoints.volumes=tcp://127.0.0.1:{port}",
                    f"endpoints.results=tcp://127.0.0.1:{port + 1}", "viewer.enabled=false",
                    f"decode.prior_steps={self.prior_steps}", f"journal_fsync={self.fsync}"]
        return service_command(self.work_dir, out_dir, port, prior_steps=self.prior_steps, fsync=self.fsync,
                               gap_wait_s=None)


# ---- the sender, a process of its own (so that it can be killed too) ------------------------------------

@dataclass(frozen=True)
class MarkSent:
    """A frame hook (replay applies an item's `tampers` to its frames just before sending) that leaves the
    frames alone and records how far into the session the sender is: volumes sent, counted from the
    session's first volume."""

    progress: object  # a multiprocessing Value
    position: int

    def __call__(self, frames: list) -> list:
        self.progress.value = self.position
        return frames


def send_session(spec: SessionSpec, runs: tuple[int, ...], endpoint: str, speed: float, progress, summary_path: Path
                 ) -> None:
    from simulators.replay import replay

    counts = spec.n_volumes()
    before = {run: sum(counts[r] for r in spec.runs if r < run) for run in spec.runs}

    class Marked:
        def runs(self):
            for plan in spec.replay_source(runs).runs():
                yield [replace(item, tampers=item.tampers + (MarkSent(progress, before[item.run] + item.index + 1),))
                       if item.type == "volume" else item for item in plan]

    summary = replay(Marked(), endpoint, speed=speed, ack_wait_s=10.0)
    summary_path.write_text(json.dumps({"acks": dict(summary.acks), "sent": dict(summary.sent),
                                        "unacked": summary.unacked}))


# ---- the subscriber that stays ----------------------------------------------------------------------------

class Subscriber:
    """A SUB connected for the whole session (ZeroMQ reconnects it to each new life of the service)."""

    def __init__(self, endpoint: str):
        import zmq

        from mindeye.protocol import result_subscriber

        self.context = zmq.Context()
        self.socket = result_subscriber(self.context, endpoint)
        self.received: Counter = Counter()
        self.malformed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="subscriber", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from mindeye.protocol import ProtocolError, Result, recv

        while not self._stop.is_set():
            try:
                message = recv(self.socket, 100)
            except ProtocolError:
                self.malformed += 1
                continue
            if isinstance(message, Result):
                self.received[(message.session, message.run, message.trial)] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close()
        self.context.term()


# ---- one session, with or without kills ---------------------------------------------------------------

def run_session(spec: SessionSpec, out_dir: Path, port: int, kill_points: list[int], speed: float,
                rng: np.random.Generator, console: Path, progress_bar=None) -> dict:
    """Replay the session into the service, killing it (and the sender) at each point; returns what
    happened: per kill, and the subscriber's counts."""
    spawn = multiprocessing.get_context("spawn")
    progress = spawn.Value("q", 0, lock=False)  # no lock: a sender killed while holding it would hang us
    counts = spec.n_volumes()
    before = {run: sum(counts[r] for r in spec.runs if r < run) for run in spec.runs}
    endpoint = f"tcp://127.0.0.1:{port}"
    summaries = out_dir.parent / f"{out_dir.name}-senders"
    summaries.mkdir(parents=True, exist_ok=True)

    def start_sender(first_run: int, n: int):
        progress.value = before[first_run]
        sender = spawn.Process(target=send_session, name=f"sender-{n}", daemon=True,
                               args=(spec, tuple(r for r in spec.runs if r >= first_run), endpoint, speed, progress,
                                     summaries / f"{n}.json"))
        sender.start()
        return sender

    def first_unfinished() -> int | None:
        return next((run for run in spec.runs
                     if not (out_dir / "betas" / f"{spec.session_id()}_run-{run:02d}.npz").is_file()), None)

    subscriber = Subscriber(f"tcp://127.0.0.1:{port + 1}")
    session_start = time.monotonic()
    service = start_service(spec.service_command(out_dir, port), console)
    lives = [{"listen_s": wait_listening(out_dir, service, 1, console), "results_before": 0}]
    sender, n_senders = start_sender(spec.runs[0], 0), 1
    kills = []
    try:
        for point in kill_points:
            while sender is not None and progress.value < point:  # no sender: all is in, kill at once
                if not sender.is_alive():
                    raise RuntimeError(f"the sender ended (exit code {sender.exitcode}) at volume {progress.value} of "
                                       f"the session, before the kill point {point}")
                time.sleep(0.005)
            time.sleep(rng.uniform(0, spec.tr_s() / speed))  # anywhere between two volumes
            at = progress.value
            service.send_signal(signal.SIGKILL)
            service.wait()
            killed_unix_s = time.time()
            if sender is not None:
                sender.kill()
                sender.join()
            results_now = len(read_results(out_dir))
            resume = first_unfinished()
            run = max(r for r in spec.runs if before[r] < max(at, 1))
            kills.append({"at": at, "run": run, "volume": at - before[run] - 1,
                          "t_s": time.monotonic() - session_start, "killed_unix_s": killed_unix_s,
                          "results": results_now, "resume": resume})
            service = start_service(spec.service_command(out_dir, port), console)
            listen_s = wait_listening(out_dir, service, len(lives) + 1, console)
            lives.append({"listen_s": listen_s, "results_before": results_now})
            sender = None
            if resume is not None:  # else every run is finished: nothing to resend
                sender, n_senders = start_sender(resume, n_senders), n_senders + 1
            if progress_bar is not None:
                progress_bar.update(1)
        if sender is not None:
            sender.join(timeout=sum(counts.values()) * spec.tr_s() / speed + 120)
            if sender.is_alive() or sender.exitcode:
                raise RuntimeError(f"the last sender did not finish (exit code {sender.exitcode})")
        expected = sum(len(t) for t in spec.trials().values())
        deadline = time.monotonic() + 120
        while len({(r["run"], r["trial"]) for r in read_results(out_dir)}) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the last results reach the subscriber
    finally:
        if sender is not None and sender.is_alive():
            sender.kill()
        code = stop_service(service)
        subscriber.close()
    try:
        last_sender = json.loads((summaries / f"{n_senders - 1}.json").read_text())
    except (OSError, ValueError):  # the last sender was killed (before or while writing it)
        last_sender = {"acks": "none: the last sender was killed"}
    return {"kills": kills, "lives": lives, "received": subscriber.received, "malformed": subscriber.malformed,
            "exit_code": code, "last_sender": last_sender, "wall_s": time.monotonic() - session_start}


# ---- the checks ---------------------------------------------------------------------------------------

def compare_betas(spec: SessionSpec, out_dir: Path, reference_dir: Path) -> list[dict]:
    rows = []
    for run in spec.runs:
        name = f"betas/{spec.session_id()}_run-{run:02d}.npz"
        if not (out_dir / name).is_file() or not (reference_dir / name).is_file():
            rows.append({"run": run, "present": False})
            continue
        got, want = np.load(out_dir / name), np.load(reference_dir / name)
        same_trials = np.array_equal(got["trial"], want["trial"]) and np.array_equal(got["image_id"], want["image_id"])
        a, b = got["betas_nv"], want["betas_nv"]
        same_shape = a.shape == b.shape
        diff = np.abs(a.astype(np.float64) - b) if same_shape else np.array([np.inf])
        rows.append({"run": run, "present": True, "trials": len(got["trial"]), "same_trials": bool(same_trials),
                     "identical": bool(same_trials and same_shape and np.array_equal(a, b, equal_nan=True)),
                     "max_abs_diff": float(np.nanmax(diff)) if np.isfinite(diff).any() else 0.0,
                     "same_missing": bool(np.array_equal(got["missing_volumes"], want["missing_volumes"]))})
    return rows


def missed_causes(missed: set, results: list[dict], kills: list[dict]) -> Counter:
    """Why the subscriber lacks each missed result, from results.jsonl."""
    by_key = {(r["session"], r["run"], r["trial"]): r for r in results}
    causes = Counter()
    for key in missed:
        record = by_key.get(key)
        if record is None:
            causes["never published"] += 1
        elif "recovered" in record["flags"]:
            causes["flag recovered: published by a restarted service right after its start"] += 1
        elif any(0 <= k["killed_unix_s"] - record["published_unix_s"] < 1.0 for k in kills):
            causes["published < 1 s before a kill"] += 1
        else:
            causes["published mid-life"] += 1
    return causes


def check(spec: SessionSpec, out_dir: Path, session: dict) -> dict:
    """results.jsonl and the subscriber against the expected trials."""
    sid = spec.session_id()
    expected = {(sid, run, trial) for run, trials in spec.trials().items() for trial in trials}
    results = read_results(out_dir)
    published = Counter((r["session"], r["run"], r["trial"]) for r in results)
    received = session["received"]
    flags = Counter(flag for r in results for flag in r["flags"])
    missed = expected - set(received)
    return {"expected": len(expected), "published": len(published), "missing": sorted(expected - set(published)),
            "twice": sorted(k for k, n in published.items() if n > 1),
            "unexpected": sorted(set(published) - expected), "flags": dict(flags),
            "received": len(set(received) & expected), "missed": sorted(missed),
            "received_twice": sorted(k for k, n in received.items() if n > 1),
            "missed_causes": dict(missed_causes(missed, results, session["kills"]))}


# ---- main ---------------------------------------------------------------------------------------------

def kill_points(n_kills: int, total_volumes: int, rng: np.random.Generator) -> list[int]:
    """`n_kills` distinct positions (volumes sent) in [1, total], sorted: random points across the session."""
    if n_kills > total_volumes:
        raise ValueError(f"{n_kills} kills in a session of {total_volumes} volumes")
    return sorted(rng.choice(np.arange(1, total_volumes + 1), n_kills, replace=False).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs across the session (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="runs in the session (default 3)")
    parser.add_argument("--source", choices=("world", "nsd-size"), default="world",
                        help="the tiny world's runs (73 volumes, 18 trials) or soak.py's NSD-size runs")
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("MINDEYE_DATA", REPO / "data")) / "world" / "tiny",
                        help="the world (default $MINDEYE_DATA/world/tiny, else data/world/tiny)")
    parser.add_argument("--session", type=int, default=1, help="the world's session of subject 1 (default 1)")
    parser.add_argument("--volumes", type=int, default=NSD_VOLUMES, help="nsd-size: volumes a run")
    parser.add_argument("--speed", type=float, default=10.0, help="times real time (default 10)")
    parser.add_argument("--prior-steps", type=int, default=2, help="the service's prior steps (default 2)")
    parser.add_argument("--fsync", default="always", help="the service's journal_fsync (default always)")
    parser.add_argument("--seed", type=int, default=0, help="the kill points and delays (and nsd-size data)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/kill9_session.txt")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.kills < 0 or args.runs < 1 or args.speed <= 0:
        parser.error("--kills must be >= 0, --runs >= 1, --speed > 0")

    from tqdm import tqdm

    say = Report()
    say(command_line("kill9_session.py"))
    for line in machine_lines():
        say(line)
    with tempfile.TemporaryDirectory(prefix="kill9-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        spec = SessionSpec(args.source, tuple(range(1, args.runs + 1)), work_dir, data_root=args.data_root.resolve(),
                           session=args.session, volumes=args.volumes, seed=args.seed, prior_steps=args.prior_steps,
                           fsync=args.fsync)
        if args.source == "world":
            untrained_checkpoint(spec.data_root, work_dir / "checkpoint")
        else:
            roi = make_roi(work_dir)
            make_checkpoint(work_dir / "checkpoint", roi.n_voxels)
        counts, trials = spec.n_volumes(), spec.trials()
        rng = np.random.default_rng(args.seed)
        points = kill_points(args.kills, sum(counts.values()), rng)
        say(f"session: {args.source} {spec.session_id()}, runs {list(spec.runs)} of {list(counts.values())} volumes, "
            f"{sum(len(t) for t in trials.values())} image trials, TR {spec.tr_s():.3f} s, speed {args.speed:g}x; "
            f"service: {'python -m realtime.cli' if args.source == 'world' else 'benchmarks/soak.py --serve'}, "
            f"tiny model untrained, prior {args.prior_steps} steps, journal fsync {args.fsync}")
        say(f"kill points (volumes sent in the session, then up to one TR/speed more): {points}")
        port = free_port_pair()

        reference = run_session(spec, work_dir / "reference", port, [], args.speed, rng, work_dir / "console.txt")
        bar = tqdm(total=args.kills, desc="kills", unit="kill", file=sys.stderr)
        killed = run_session(spec, work_dir / "killed", port, points, args.speed, rng, work_dir / "console.txt", bar)
        bar.close()
        reference_check = check(spec, work_dir / "reference", reference)
        killed_check = check(spec, work_dir / "killed", killed)
        betas = compare_betas(spec, work_dir / "killed", work_dir / "reference")
        results = read_results(work_dir / "killed")
        report(say, reference, killed, reference_check, killed_check, betas, results)
    say.write(args.output)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "kills": len(killed["kills"]), "expected": killed_check["expected"],
            "published_once": not (killed_check["missing"] or killed_check["twice"] or killed_check["unexpected"]),
            "missing_in_results": len(killed_check["missing"]), "twice_in_results": len(killed_check["twice"]),
            "betas_identical": all(r["present"] and r["identical"] for r in betas),
            "betas_within_1e-6": all(r["present"] and r["same_trials"] and r["max_abs_diff"] <= 1e-6 for r in betas),
            "subscriber_missed": len(killed_check["missed"]), "subscriber_twice": len(killed_check["received_twice"]),
            "missed_causes": killed_check["missed_causes"], "flags": killed_check["flags"],
            "reference_subscriber_missed": len(reference_check["missed"]),
            "exit_codes": [reference["exit_code"], killed["exit_code"]]}, indent=1))


def report(say: Report, reference: dict, killed: dict, reference_check: dict, killed_check: dict, betas: list[dict],
           results: list[dict]) -> None:
    say()
    say(f"reference (no kill): {reference_check['published']}/{reference_check['expected']} trials published, "
        f"the subscriber received {reference_check['received']}; {reference['wall_s']:.0f} s, the service listened "
        f"after {reference['lives'][0]['listen_s']:.1f} s; last sender's acks {reference['last_sender']['acks']}")
    say()
    say("per kill: where it landed, what was published by then, the restart, and what the next life published "
        "at once (flag recovered; skipped among them)")
    say(f"{'kill':>4} {'t s':>6} {'run':>3} {'vol':>4} {'results':>7} {'restart s':>9} {'resend':>6} "
        f"{'recovered':>9} {'skipped':>7}")
    lives = killed["lives"]
    for k, kill in enumerate(killed["kills"]):
        life = results[lives[k + 1]["results_before"]:(lives[k + 2]["results_before"] if k + 2 < len(lives) else None)]
        recovered = [r for r in life if "recovered" in r["flags"]]
        say(f"{k + 1:>4} {kill['t_s']:>6.1f} {kill['run']:>3} {kill['volume']:>4} {kill['results']:>7} "
            f"{lives[k + 1]['listen_s']:>9.1f} {('run ' + str(kill['resume'])) if kill['resume'] else '-':>6} "
            f"{len(recovered):>9} {sum('skipped' in r['flags'] for r in recovered):>7}")
    say(f"{len(killed['kills'])} kills, {len(lives)} lives of the service, {killed['wall_s']:.0f} s; the last "
        f"sender's acks {killed['last_sender']['acks']}; flags over the session {killed_check['flags']}")
    say()
    once = not (killed_check["missing"] or killed_check["twice"] or killed_check["unexpected"])
    say(f"published exactly once (results.jsonl): {'yes' if once else 'NO'}: {killed_check['published']} of "
        f"{killed_check['expected']} trials, {len(killed_check['missing'])} missing, {len(killed_check['twice'])} "
        f"twice {killed_check['twice'][:5]}, {len(killed_check['unexpected'])} unexpected")
    identical = all(r["present"] and r["identical"] for r in betas)
    say(f"betas identical to the uninterrupted run: {'yes, bit for bit' if identical else 'NO'}")
    for r in betas:
        if not r["present"]:
            say(f"  run {r['run']}: a betas file is missing")
        elif not r["identical"]:
            say(f"  run {r['run']}: {r['trials']} trials, same trials {r['same_trials']}, max |diff| "
                f"{r['max_abs_diff']:.3g}, same missing volumes {r['same_missing']}")
    say(f"the subscriber that stayed connected received {killed_check['received']} of {killed_check['expected']} "
        f"trials: {len(killed_check['missed'])} missed, {len(killed_check['received_twice'])} received twice")
    for cause, n in sorted(killed_check["missed_causes"].items(), key=lambda item: -item[1]):
        say(f"  missed: {n} {cause}")


if __name__ == "__main__":
    main()
