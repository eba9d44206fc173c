"""Seed ``maskc bench``'s row store from a partial folder committed in git history, where the rows' code is today's.

``maskc bench`` keeps each sampled row in a row store (``benchmarks/results/rows/<table>/``, git-ignored) under
its mask's bits, the code that turns bits into a row (``row_version``) and the settings that decide a sample,
and a later run whose learning code changed reuses the rows of masks with the same bits instead of sampling
them again. A fresh checkout has no store. While a table is made over several sessions, its partial folder
(each finished row's figures, classifier features and per-sample PSNR) is committed; this script reads such a
folder at git revision ``--rev`` and stores its rows as the bench would have, after checking that:

- the files of ``row_version`` at ``--rev`` hash to today's ``row_version`` (the same sampling and scoring code);
- the model's weights, the classifier and the evaluation statistics at ``--rev`` are today's;
- the table's settings that decide a sample (``ROW_KEY``: sampler, steps, n, batch, seed, threads, guidance),
  read from the table JSON at ``--table-rev`` (the commit that wrote the table from that folder), are the ones
  given here, which the run to be resumed uses;
- each row's file name is the digest of its method and the bits of the mask the table names for it (so the
  bits the row is stored under are the bits it was sampled with).

Rows that fail a check are skipped and named. Each stored row says where it came from (``stored.from_git``);
the bench marks rows it takes from the store ``sampled_by: row store``.

Usage: python benchmarks/seed_row_store.py --table bench_sd_ddim20 --rev 83276ab --table-rev 0851cc6
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import tempfile

import torch
from safetensors.torch import load as load_safetensors

import maskc
from maskc.bench import (ROW_FIGURES, BenchConfig, _bits_digest, _digest, bench_model, row_store, row_version,
                         run_key, weights_version)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def git(*args: str) -> bytes:
    return subprocess.check_output(["git", *args], cwd=ROOT)


def ls(rev: str, folder: str) -> list[str]:
    return [p for p in git("ls-tree", "-r", "--name-only", rev, "--", folder).decode().splitlines() if p]


def show(rev: str, path: str) -> bytes:
    return git("show", f"{rev}:{path}")


def tree_at(rev: str, paths: list[str], dest: str) -> str:
    """Extract ``paths`` of commit ``rev`` under ``dest`` (laid out as the repository) and return ``dest``, so
    that ``row_version`` and ``weights_version`` hash an older commit's files with today's code."""
    archive = git("archive", "--format=tar", rev, "--", *paths)
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def tensor_at(rev: str, path: str) -> torch.Tensor:
    return load_safetensors(show(rev, path))["x"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True, help="the table's name, e.g. bench_sd_ddim20")
    ap.add_argument("--rev", required=True, help="a commit whose partial/<table>/ folder holds the rows")
    ap.add_argument("--table-rev", required=True, help="the commit that wrote <table>.json from those rows")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    out_rel = os.path.relpath(a.out, ROOT)
    table = json.loads(show(a.table_rev, f"{out_rel}/{a.table}.json"))
    c = table["config"]
    cfg = BenchConfig(**{k: v for k, v in c.items() if k in BenchConfig.__dataclass_fields__})
    bm = bench_model(cfg.model, cfg.guidance_scale)
    from maskc.eval import EVAL_DIR
    from maskc.models.classifier import WEIGHTS as classifier_dir
    weights = [os.path.relpath(f, ROOT) for f in (bm.path, classifier_dir, EVAL_DIR)]
    today = row_version()
    with tempfile.TemporaryDirectory() as tmp:
        then_root = tree_at(a.rev, ["maskc", "passes"], tmp)
        then = row_version(then_root)
        if then != today:
            raise SystemExit(f"row code at {a.rev} is {then}, today's is {today}: its rows would not be today's")
        for rel in weights:
            if weights_version(os.path.join(then_root, rel)) != weights_version(os.path.join(ROOT, rel)):
                raise SystemExit(f"{rel} at {a.rev} differs from today's")
    store = row_store(a.out, a.table, run_key(cfg, bm.path, "", bm.guidance), today)
    parts = {os.path.dirname(p) for p in ls(a.rev, f"{out_rel}/partial/{a.table}")}
    if len(parts) != 1:
        raise SystemExit(f"expected one partial folder of {a.table} at {a.rev}, found {sorted(parts)}")
    part = parts.pop()
    files = set(ls(a.rev, part))
    stamp = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "code_version": table["code_version"], "row_version": then, "from_git": f"{a.rev}:{part}"}
    done, skipped = 0, []
    for r in table["rows"]:
        if r["family"] == "original":
            ident, sid = (r["method"], None), "original"
        else:
            path = f"{out_rel}/{r['mask_file']}"
            mask = maskc.Mask.from_dict(json.loads(show(a.table_rev, path)), source=f"{a.table_rev}:{path}")
            ident, sid = (r["method"], _bits_digest(mask)), _bits_digest(mask)
        d = _digest(ident)
        need = [f"{part}/row-{d}.json", f"{part}/features-{d}.safetensors"]
        need += [f"{part}/psnr-{d}.safetensors"] if sid != "original" else []
        if not all(p in files for p in need):
            skipped.append(f"{r['method']} (no row of its bits at {a.rev})")
            continue
        row = json.loads(show(a.rev, need[0]))
        if any(row.get(k) != r.get(k) for k in ("fd", "psnr")):
            skipped.append(f"{r['method']} (the folder's row differs from the table's)")
            continue
        if store.get("row", sid) is not None:
            continue
        store.put_tensor(f"features-{_digest(sid)}", tensor_at(a.rev, need[1]))
        if sid != "original":
            store.put_tensor(f"psnr-{_digest(sid)}", tensor_at(a.rev, need[2]))
        elif f"{part}/original.safetensors" in files:
            store.put_tensor("original", tensor_at(a.rev, f"{part}/original.safetensors"))
        store.put("row", sid, {**{k: row[k] for k in ROW_FIGURES if k in row}, "stored": stamp})
        done += 1
    print(f"{done} rows stored in {store.dir} from {a.rev}:{part} (row code {then}, today's); skipped: "
          + ("; ".join(skipped) or "none"))


if __name__ == "__main__":
    main()
