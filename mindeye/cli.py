"""What every command does around its work: short errors that say what to do next, and misspelt keys.

`command(config_name, app)` replaces `@hydra.main` on a command's `main(cfg)`. Before hydra runs, the
key=value overrides are checked against the composed config, so `sped=4` gets "unknown key 'sped';
did you mean 'speed'?" instead of hydra's advice to add `+sped`. While the command runs, the project's
own errors end it with one or two lines on stderr - what was wrong, where, what to do next - and an
exit code per kind (EXIT_CODES); anything else is a bug and keeps its traceback. `debug=true` on the
command line or HYDRA_FULL_ERROR=1 shows every traceback. A failed command removes the output folder
it created if it left it empty. `plain_command(app)` gives an argparse command's `main` the same errors
(HYDRA_FULL_ERROR=1 shows the traceback there too).

`require_data_root` and `require_checkpoint` turn the usual missing inputs into errors that name the
setting to change; commands call them before loading anything heavy.

Only light modules are imported here (hydra, omegaconf, the stdlib): `--help` must answer in about a
second, so commands import torch and the model stack inside `main`, not at the top of their module.
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mindeye.errors import ConfigValueError, FormatError, MissingFileError, PortInUse, ServiceUnavailable

EXIT_CODES = {"config": 2, "missing file": 3, "bad format": 4, "busy port": 5, "no service": 6}
# What to do about a busy port bound without naming its setting (PortInUse names its own)
PORTS_HINT = "choose another port on the command line (e.g. viewer.port=8081, endpoints.volumes=tcp://127.0.0.1:5565)"


def command(config_name: str, app: str) -> Callable:
    """Decorate `main(cfg)`: hydra's entry point with key checks and short errors (module docstring)."""

    def decorate(task: Callable) -> Callable:
        import hydra

        from mindeye.config import CONFIG_DIR

        @functools.wraps(task)
        def run(cfg) -> None:
            with user_errors(app, debug=bool(cfg.get("debug", False)), cleanup=_new_output_dirs(cfg)):
                task(cfg)

        hydra_main = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(run)

        @functools.wraps(task)
        def entry() -> None:
            problem = check_overrides(config_name, sys.argv[1:])
            if problem:
                print(f"{app}: {problem} (see {app} --help)", file=sys.stderr)
                sys.exit(EXIT_CODES["config"])
            hydra_main()

        return entry

    return decorate


def plain_command(app: str, *, ports: str = PORTS_HINT) -> Callable:
    """Decorate an argparse command's `main`: the project's errors end it as they end a hydra command;
    `ports` says how to move the command's port when it is taken."""

    def decorate(task: Callable) -> Callable:
        @functools.wraps(task)
        def run(*args, **kwargs):
            with user_errors(app, ports=ports):
                return task(*args, **kwargs)

        return run

    return decorate


@contextlib.contextmanager
def user_errors(app: str, *, debug: bool = False, cleanup: Iterable[Path] = (), ports: str = PORTS_HINT
                ) -> Iterator[None]:
    """A project error in the block ends the command with one line on stderr and its EXIT_CODES code;
    any other error, and every error with `debug` or HYDRA_FULL_ERROR=1, keeps its traceback. On any
    error the folders in `cleanup` are removed if they were left empty."""
    try:
        yield
    except BaseException as error:
        for path in cleanup:
            _remove_if_empty(path)
        debug = debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
        kind = None if debug else error_kind(error)
        if kind is None:
            raise
        print(f"{app}: {error_text(error, ports)}", file=sys.stderr)
        sys.exit(EXIT_CODES[kind])


def error_kind(error: BaseException) -> str | None:
    """Which of EXIT_CODES `error` is, or None for anything that is not a user's error."""
    if isinstance(error, MissingFileError):
        return "missing file"
    if isinstance(error, FormatError):
        return "bad format"
    if isinstance(error, ConfigValueError):
        return "config"
    if isinstance(error, ServiceUnavailable):
        return "no service"
    if port_taken(error):
        return "busy port"
    return None


def error_text(error: BaseException, ports: str = PORTS_HINT) -> str:
    if port_taken(error) and not isinstance(error, PortInUse):
        return f"{error}: another program (perhaps another mindeye command) holds that port; stop it or {ports}"
    return str(error)


def port_taken(error: BaseException) -> bool:
    """Whether `error` is a bind to a port that is taken: an OSError or zmq.ZMQError with EADDRINUSE, or an
    error raised from one (LiveViewer.start re-raises the bind's error with the address it tried)."""
    return errno.EADDRINUSE in (getattr(error, "errno", None), getattr(error.__cause__, "errno", None))


# ---- the usual missing inputs ---------------------------------------------------------------------------

def log_to(log_file: Path, level: str) -> None:
    """Log records at `level` to the console and to `log_file` (its folder made)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(level)


def require_data_root(root, setting: str = "data.root") -> Path:
    """`root` if it holds an NSD tree (real NSD or the synthetic world), else a MissingFileError saying how
    to make one there or how to point `setting` elsewhere."""
    from mindeye.nsd.layout import NSDLayout

    design = NSDLayout(Path(str(root))).expdesign()
    if not design.is_file():
        raise MissingFileError(design, "NSD data's experiment design",
                               f"run `mindeye-world out_dir={root}` first to write the synthetic world there, or set "
                               f"{setting}=PATH or MINDEYE_DATA to where the data is")
    return Path(str(root))


def require_checkpoint(path, setting: str = "checkpoint") -> Path:
    """`path` if it is a checkpoint folder, else a MissingFileError saying how to get one."""
    path = Path(str(path))
    config = "config.json"  # mindeye.models.checkpoint.CONFIG_FILE, named here to answer before torch loads
    if (path / config).is_file():
        return path
    if (path / "checkpoint" / config).is_file():  # a training run's folder rather than its checkpoint
        raise MissingFileError(path / config, "checkpoint", f"{path} is a training run: pass "
                                                            f"{setting}={path / 'checkpoint'}")
    raise MissingFileError(path / config, "checkpoint", f"train one with mindeye-train, which writes "
                                                        f"OUT_DIR/checkpoint, or pass {setting}=PATH")


# ---- overrides --------------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"([A-Za-z_][\w.]*)=")


def check_overrides(config_name: str, arguments: list[str]) -> str | None:
    """What is wrong with the key=value arguments (an unknown key, an unknown config choice), or None."""
    overrides = [a for a in arguments if not a.startswith(("-", "+", "~", "hydra.", "hydra/"))]
    if not overrides or not all(_OVERRIDE.match(a) for a in overrides):
        return None  # flags (--help, --cfg) and hydra's own syntax are hydra's business
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf import OmegaConf

    from mindeye.config import load_config

    try:
        load_config(config_name, overrides)
        return None
    except MissingConfigException as error:
        return _unknown_choice(str(error))
    except OverrideParseException as error:  # e.g. `key=<x>`: hydra's grammar, said in one line, not a traceback
        return f"cannot parse '{error.override}' as key=value"
    except ConfigCompositionException as error:
        cause = str(error.__cause__ or error)
        unknown = re.search(r"Key '([^']+)' is not in struct", cause) or re.search(
            r"Could not override '([^']+)'", str(error))
        if unknown is None:
            return str(error).splitlines()[0]
    key = next(a.split("=", 1)[0] for a in overrides if a.split("=", 1)[0].endswith(unknown[1]))
    known = _keys(OmegaConf.to_container(load_config(config_name), resolve=False))
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key '{key}'" + (f"; did you mean '{near[0]}'?" if near else "")


def _unknown_choice(text: str) -> str:
    group = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    options = re.findall(r"^\s+(\S+)\s*$", text.split("Available options:", 1)[-1], flags=re.MULTILINE)
    if group is None:
        return text.splitlines()[0]
    return f"unknown {group[1]} '{group[2]}'" + (f"; choose one of {', '.join(options)}" if options else "")


def _keys(tree, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for name, value in tree.items():
            yield f"{prefix}{name}"
            yield from _keys(value, f"{prefix}{name}.")


# ---- output folders -----------------------------------------------------------------------------------

def _new_output_dirs(cfg) -> list[Path]:
    """The folders this run of a command made: hydra's run folder (which hydra has just made), unless that
    is the working directory, and its out_dir if not there yet - or if it holds nothing but that run folder
    (mindeye-evaluate's out_dir/hydra: hydra made out_dir with it)."""
    from hydra.core.hydra_config import HydraConfig

    made = []
    if HydraConfig.initialized():
        run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
        if run_dir != Path.cwd().resolve():
            made.append(run_dir)
    if isinstance(cfg.get("out_dir"), str):
        out_dir = Path(cfg.out_dir)
        if not out_dir.exists() or (made and [p.resolve() for p in out_dir.iterdir()] == made):
            made.insert(0, out_dir)
    return made


def _remove_if_empty(path: Path) -> None:
    """Remove `path` if it holds nothing but empty files and hydra's own record of the config (.hydra/),
    and is not the working directory or above it."""
    if not path.is_dir() or Path.cwd().resolve().is_relative_to(path.resolve()):
        return
    if any(p.is_file() and p.stat().st_size and ".hydra" not in p.relative_to(path).parts for p in path.rglob("*")):
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)
