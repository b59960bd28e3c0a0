"""Runs `moefy convert` on each bad input and prints the Markdown table of messages and exit codes.

    python benchmarks/reliability_table.py > /tmp/table.md
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "hf"
CALIB = SHARED / "data" / "tinystories" / "validation_head.txt"


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    trunc = tmp / "truncated"
    shutil.copytree(STORIES, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    pkl = tmp / "pickle_only"
    pkl.mkdir()
    shutil.copy(STORIES / "config.json", pkl)
    (pkl / "pytorch_model.bin").write_bytes(b"x")
    gguf = tmp / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    (tmp / "empty.txt").write_text("")
    (tmp / "data.parquet").write_text("x")
    (tmp / "short.txt").write_text("Once upon a time.")
    exists = tmp / "exists"
    exists.mkdir()
    gpt2 = tmp / "gpt2"
    subprocess.run([sys.executable, "-c", f"from transformers import AutoConfig, AutoModelForCausalLM; "
                    f"AutoModelForCausalLM.from_config(AutoConfig.for_model('gpt2', n_layer=1, n_embd=16, n_head=2)).save_pretrained({str(gpt2)!r})"], check=True)
    base = ["--calib", str(CALIB), "--calib-tokens", "1024", "--seq-len", "128"]
    cases = [
        ("missing model", [str(tmp / "nope")] + base),
        ("unsupported architecture (GPT-2)", [str(gpt2)] + base),
        ("truncated safetensors", [str(trunc)] + base),
        ("pickle-only checkpoint", [str(pkl)] + base),
        ("corrupt GGUF", [str(gguf)] + base),
        ("E < 2", [str(STORIES), "--experts", "1"] + base),
        ("k < 1", [str(STORIES), "--top-k", "0"] + base),
        ("k > E", [str(STORIES), "--experts", "4", "--top-k", "5"] + base),
        ("E > d_ffn", [str(STORIES), "--experts", "200"] + base),
        ("empty calibration file", [str(STORIES), "--calib", str(tmp / "empty.txt")]),
        ("calibration shorter than one sequence", [str(STORIES), "--calib", str(tmp / "short.txt"), "--seq-len", "128"]),
        ("unknown calibration format", [str(STORIES), "--calib", str(tmp / "data.parquet")]),
        ("missing calibration file", [str(STORIES), "--calib", str(tmp / "nofile.txt")]),
        ("output exists", [str(STORIES)] + base + ["--out-override", str(exists)]),
    ]
    print("| bad input | exit code | message |")
    print("|---|---|---|")
    for name, args in cases:
        out = str(tmp / "out")
        if "--out-override" in args:
            i = args.index("--out-override")
            out = args[i + 1]
            args = args[:i]
        res = subprocess.run([sys.executable, "-m", "moefy.cli", "convert", *args, "--out", out],
                             capture_output=True, text=True, env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"})
        msg = " ".join(res.stderr.strip().split())
        msg = msg.replace(str(tmp), "<tmp>").replace(str(SHARED), "../shared")
        print(f"| {name} | {res.returncode} | `{msg}` |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
