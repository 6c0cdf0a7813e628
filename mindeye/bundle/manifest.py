"""The export bundle's manifest: what a bundle holds, read and checked before anything loads.

A bundle is a folder that `mindeye-export` writes and the realtime service loads (docs/export.md):

    manifest.json            this file's content (FORMAT, FORMAT_VERSION)
    checkpoint/              the model's safetensors weights, config.json and calibration.safetensors
    generator/               the reconstruction generator (diffusers folder), when one was exported
    graphs/<name>.onnx       ONNX graphs (+ <name>.onnx.data for graphs over 2 GB), when exported
    engines/                 TensorRT engines, built on the GPU host (keyed by GPU model and TensorRT version)

Every file the manifest names carries its sha256, checked by `read_manifest`, so a bundle copied to the
scanner room loads exactly what was exported and parity-checked, or refuses with the file at fault.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindeye.errors import FormatError, MissingFileError, read_format_json

FORMAT = "mindeye2-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CHECKPOINT_DIR = "checkpoint"
GENERATOR_DIR = "generator"
GRAPHS_DIR = "graphs"
ENGINES_DIR = "engines"
BATCH = "batch"  # the symbolic leading dimension of every graph input and output

# Graph names: one heads graph per subject, then the denoisers stepped by samplers in the runtime.
PRIOR_DENOISER = "prior_denoiser"
GENERATOR_UNET = "generator_unet"
GENERATOR_DECODER = "generator_decoder"


def heads_graph(subject: str) -> str:
    """The name of `subject`'s aligner + backbone + heads graph."""
    return f"heads.{subject}"


@dataclass(frozen=True)
class Bundle:
    """A read and checked bundle: its folder and its manifest (a dict, as docs/export.md describes it)."""

    root: Path
    manifest: dict[str, Any]

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / self.manifest["checkpoint"]["dir"]

    @property
    def generator_dir(self) -> Path | None:
        generator = self.manifest.get("generator")
        return self.root / generator["dir"] if generator else None

    @property
    def subjects(self) -> dict[str, int]:
        """subject -> voxel count, for the subjects the bundle decodes."""
        return {name: spec["n_voxels"] for name, spec in self.manifest["subjects"].items()}

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        """Exported graph files by graph name (none in an eager bundle)."""
        return self.manifest.get("graphs", {})

    def interface(self, name: str):
        """The inputs and outputs of graph `name` (a GraphSpec), exported or not."""
        from mindeye.bundle.graphs import GraphSpec

        return GraphSpec.from_json(self.manifest["interface"][name])

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise FormatError(self.root / MANIFEST_FILE, "graphs", f"a graph named {name!r}",
                              f"only {sorted(self.graphs) or 'none'}: re-export with mindeye-export "
                              "backend=onnxruntime (or tensorrt) to write ONNX graphs")
        return self.root / self.graphs[name]["file"]


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_folder(folder: str | Path) -> str:
    """One hash of a folder's files: their relative paths and contents, in sorted order."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json last (through a temporary file): a folder with one holds a complete bundle."""
    path = Path(root) / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_manifest(root: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """The bundle in `root`, its manifest's format and version checked and every file it names present
    (and, with `verify_hashes`, unchanged); MissingFileError / FormatError name the file at fault."""
    root = Path(root)
    path = root / MANIFEST_FILE
    hint = (f"{root} is a checkpoint, not a bundle: make one with mindeye-export checkpoint={root} out_dir=BUNDLE"
            if (root / "config.json").is_file() else "make one with mindeye-export checkpoint=... out_dir=BUNDLE")
    manifest = read_format_json(path, "export bundle manifest", FORMAT, FORMAT_VERSION, missing_hint=hint,
                                expected_version=f"{FORMAT_VERSION} (this code's)",
                                stale_hint=": re-export the bundle with this version's mindeye-export")
    missing = [key for key in ("subjects", "checkpoint", "calibration", "clip", "precision", "backend", "interface")
               if key not in manifest]
    if missing:
        raise FormatError(path, "keys", "the keys of docs/export.md", f"no {missing}")
    for recorded in _hashed_files(manifest):
        file = root / recorded["file"]
        if not file.is_file():
            raise MissingFileError(file, f"bundle file named in {path}")
        if verify_hashes and sha256_file(file) != recorded["sha256"]:
            raise FormatError(file, "sha256", f"{recorded['sha256']} (recorded in {path})",
                              "another: the file was changed or truncated after export; re-export the bundle")
    generator = manifest.get("generator")
    if generator:
        folder = root / generator["dir"]
        if not (folder / "model_index.json").is_file():
            raise MissingFileError(folder / "model_index.json", f"bundle generator named in {path}")
        if verify_hashes and sha256_folder(folder) != generator["sha256"]:
            raise FormatError(folder, "sha256 of the generator folder", f"{generator['sha256']} (recorded in {path})",
                              "another: its files were changed after export; re-export the bundle")
    return Bundle(root, manifest)


def _hashed_files(manifest: dict[str, Any]) -> list[dict[str, str]]:
    """Every {file, sha256} record of the manifest: checkpoint weights, calibration, readouts, graphs and their
    data."""
    records = [manifest["checkpoint"]["weights"], manifest["calibration"], *filter(None, [manifest.get("readouts")])]
    for graph in manifest.get("graphs", {}).values():
        records.append(graph)
        records.extend(graph.get("external_data", []))
        if graph.get("int8"):
            records.append(graph["int8"])
    return records
