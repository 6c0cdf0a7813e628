"""The realtime service under a stream of hostile messages (issue 9): crashes, hangs, memory, journal.

The service runs as tests/test_realtime_service.py runs it (the tiny world, an untrained tiny model,
journal fsync "never"), in a child process so that a hang or a memory blow-up is stopped, not
inherited. One DEALER sends --messages fuzz messages from tests/fuzz_messages.py (hostile fields of
every message type, raw JSON, frame faults, byte damage, runs the service accepts with extreme
values, floods of new senders and never-started runs, a huge message every --huge-every), at most
--window unanswered at a time; another DEALER sends a clean run over the first half and resends it
once it closed. Printed: messages/s; acks by verdict and reason; missing acks (hangs); max and p99
time from send to ack; the service's RSS at the start, peak and end; the journal's size against
its bound (decodable messages in full, refused ones 4 KB each); crashes (a thread dead, an
uncaught exception, an error logged); and whether each trial of the clean run was published once.
The run stops early, killing the service, on a hang, a dead service, RSS over --rss-cap-mb or a
journal over its bound. The same harness is tests/test_fuzz_service.py (bounded in time there).

    .venv/bin/python benchmarks/fuzz_service.py [--messages 1000000] [--seconds inf] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "fuzz_service.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--messages", type=int, default=1_000_000, help="fuzz messages to send (default 1000000)")
    parser.add_argument("--seconds", type=float, default=math.inf, help="stop after this long (default: no limit)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fuzz stream (default 0)")
    parser.add_argument("--window", type=int, default=16, help="fuzz messages unanswered at most (default 16)")
    parser.add_argument("--ack-timeout-s", type=float, default=5.0,
                        help="an ack later than this is a hang (default 5)")
    parser.add_argument("--huge-every", type=int, default=1000, help="one huge message in this many (default 1000)")
    parser.add_argument("--skip", default="", help="comma-separated kinds or hostile values to leave out "
                                                     "(see Mutator in tests/fuzz_messages.py)")
    parser.add_argument("--rss-growth-mb", type=float, default=256.0,
                        help="RSS growth from start to end that counts as a problem (default 256)")
    parser.add_argument("--rss-cap-mb", type=float, default=4096.0,
                        help="stop the run when the service's RSS passes this (default 4096)")
    parser.add_argument("--world", type=Path, default=REPO / "data" / "world" / "tiny",
                        help="the synthetic world (default data/world/tiny; generated in a temp dir if absent)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a checkpoint for the world's subj01 (default: the tiny model, untrained)")
    parser.add_argument("--out-dir", type=Path, default=None, help="the service's out_dir (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where the figures go (default {RESULTS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.messages < 1 or args.seconds <= 0 or args.window < 1 or args.huge_every < 1:
        parser.error("--messages, --seconds, --window and --huge-every must be positive")

    sys.path.insert(0, str(REPO / "tests"))  # the one fuzz harness, shared with the test
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm

    import fuzz_messages

    from simulators.world.untrained import untrained_checkpoint

    command = "$ .venv/bin/python benchmarks/fuzz_service.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = args.world
        if not (world / "nsddata").is_dir():
            from mindeye.config import load_config
            from simulators.world.generate import generate_world

            world = work / "world" / "tiny"
            print(f"{args.world} holds no world: generating the tiny one in {world}", file=sys.stderr)
            generate_world(load_config("world_generate").world, world, progress=False)
        checkpoint = args.checkpoint or untrained_checkpoint(world, work / "model" / "checkpoint")
        out_dir = args.out_dir or work / "service"
        started = time.strftime("%a %b %d %H:%M:%S %Z %Y")
        with tqdm(total=args.messages, unit="msg", smoothing=0.05, mininterval=1.0, disable=args.no_progress,
                  file=sys.stderr) as bar:
            report = fuzz_messages.fuzz_service(world, checkpoint, out_dir, messages=args.messages,
                                                seconds=args.seconds, seed=args.seed, window=args.window,
                                                ack_timeout_s=args.ack_timeout_s, rss_cap_mb=args.rss_cap_mb,
                                                huge_every=args.huge_every, skip=[k for k in args.skip.split(",") if k],
                                                progress=bar.update)
        text = "\n".join([
            command, started,
            f"machine: {platform.node()}, {os.cpu_count()} cores, load average at the end "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"service: the tiny world {world}, checkpoint {'untrained tiny' if args.checkpoint is None else checkpoint}, "
            f"journal fsync never, in a child process; fuzz seed {args.seed}, window {args.window}, a huge message "
            f"every {args.huge_every}" + (f", leaving out {args.skip}" if args.skip else ""),
            "", report.format(args.rss_growth_mb)])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 1 if report.problems(args.rss_growth_mb) else 0


if __name__ == "__main__":
    sys.exit(main())
