"""``python -m dml embed | index | search | export``: use a trained checkpoint.

    python -m dml embed CKPT (--images DIR | --split test [--dataset NAME] [--root PATH])
        --out emb.npz [--fp16]
    python -m dml index emb.npz --out gallery.index [--kind flat|ivf|hnsw|ivfpq]
    python -m dml search gallery.index (--embeddings q.npz | --images DIR | IMAGE ...)
        [--ckpt CKPT] [--k 10] [--exclude-self] [--exact-fallback] [--nprobe N]
        [--rerank k_reciprocal|alpha_qe [--rerank-param KEY=VALUE ...]]
        --out results.json|csv [--html report.html]
    python -m dml export CKPT --format torchscript|onnx --out model.pt|model.onnx

Each is a thin wrapper of ``dml.inference`` (``Embedder``, ``SearchIndex``, ``export``). Bad
input (a missing, truncated or code-carrying checkpoint or .npz, an empty folder or file, an
index without its rows file, NaN embeddings, a checkpoint of another embedding size than the
index) is one line naming the file, exit status 2, and nothing written under the output name.
Where a parameter is clamped (k beyond the rows, nprobe beyond the cells) a ``note:`` line on
stderr says so.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import numpy as np

from dml.errors import ConfigError

COMMANDS = ("embed", "index", "search", "export")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dml", description="Use a trained checkpoint.", allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("embed", help="embed images or a data set's split into a .npz file")
    e.add_argument("ckpt")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of images (searched recursively)")
    src.add_argument(
        "--split",
        choices=("train", "test", "query", "gallery"),
        help="a split of the data set the checkpoint was trained on",
    )
    e.add_argument(
        "--dataset",
        help="with --split: a data set of experiments/data (default: "
        "the one the checkpoint was trained on)",
    )
    e.add_argument("--root", help="the data set's folder (default: the checkpoint's config)")
    e.add_argument("--out", required=True, help="output .npz")
    e.add_argument("--fp16", action="store_true", help="store the embeddings as float16")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import classes of this module that the checkpoint names (code: "
        "only for checkpoints you trust)",
    )

    i = sub.add_parser("index", help="build a faiss index of embeddings")
    i.add_argument("embeddings")
    i.add_argument("--out", required=True)
    i.add_argument("--kind", default="flat", choices=("flat", "ivf", "hnsw", "ivfpq"))
    i.add_argument("--nprobe", type=int, default=None, help="ivf / ivfpq: cells searched")

    s = sub.add_parser("search", help="the k nearest indexed rows of each query")
    s.add_argument("index")
    s.add_argument("queries", nargs="*", help="image files")
    s.add_argument("--images", help="a folder of query images")
    s.add_argument("--embeddings", help="a .npz of query embeddings (python -m dml embed)")
    s.add_argument("--ckpt", help="the checkpoint that embeds query images")
    s.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import classes of this module that the checkpoint names",
    )
    s.add_argument("--k", type=int, default=10)
    s.add_argument(
        "--exclude-self",
        action="store_true",
        help="the queries are the index's own rows: leave each out of its results",
    )
    s.add_argument(
        "--exact-fallback",
        action="store_true",
        help="approximate indexes: search the queries they find fewer than k hits "
        "for exhaustively (without it such a query gets fewer hits)",
    )
    s.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help="ivf / ivfpq: cells searched (more: slower, fewer short queries)",
    )
    s.add_argument(
        "--rerank",
        choices=("k_reciprocal", "alpha_qe"),
        help="order the hits by a re-ranking over every row of the index (exact; "
        "the cost of searching the rows against themselves)",
    )
    s.add_argument(
        "--rerank-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a re-ranking parameter (k_reciprocal: k1, k2, lam; alpha_qe: k, alpha)",
    )
    s.add_argument("--out", required=True, help="results .json or .csv")
    s.add_argument("--html", help="also write a self-contained HTML page of the results")
    s.add_argument(
        "--html-queries",
        type=int,
        default=200,
        help="the page shows the first N queries (default 200; 0: all); --out holds them all",
    )

    x = sub.add_parser("export", help="export the embedding network")
    x.add_argument("ckpt")
    x.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    x.add_argument("--out", required=True)
    x.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import classes of this module that the checkpoint names",
    )
    return p


def check_outputs(outputs, inputs) -> None:
    """Each output a file that can be written (its folder made), none a folder, an input or
    another output: checked before anything is read or written."""
    seen = set()
    for out in outputs:
        if not out:
            continue
        real = os.path.realpath(out)
        if os.path.isdir(out):
            raise ConfigError(f"{out}: is a folder; name the output file")
        if real in seen or real in {os.path.realpath(i) for i in inputs if i}:
            raise ConfigError(
                f"{out}: is also an input or another output of this command; name another file"
            )
        seen.add(real)
        folder = os.path.dirname(os.path.abspath(out))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{out}: cannot create its folder ({error.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"{out}: its folder {folder} is not writable")


def check_model_output(rows, ckpt: str) -> None:
    """A ConfigError where the checkpoint's network gave NaN or inf: nothing is written or
    searched with such rows."""
    bad = rows.non_finite_rows()
    if bad:
        raise ConfigError(
            f"{ckpt}: the network's embeddings of {bad} of {len(rows)} images hold NaN or inf "
            f"(a diverged or broken checkpoint); nothing was written"
        )


def report_unreadable(rows) -> int:
    """Print each image file that could not be read (skipped); how many there were."""
    skipped = rows.meta.get("unreadable") or []
    for path in skipped:
        print(f"unreadable, skipped: {path}", file=sys.stderr)
    return len(skipped)


def embed(args) -> None:
    from dml.inference.embedder import Embedder, image_files

    check_outputs([args.out], [args.ckpt])
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: expected a number of images >= 1")
    embedder = Embedder.from_checkpoint(args.ckpt, trust_modules=args.trust_module)
    if args.images:
        rows = embedder.embed_files(image_files(args.images), args.batch_size)
    else:
        rows = embedder.embed_split(args.split, args.root, args.batch_size, dataset=args.dataset)
    check_model_output(rows, args.ckpt)
    if args.fp16:
        rows.embeddings = rows.embeddings.astype(np.float16)
    rows.save(args.out)
    skipped = report_unreadable(rows)
    print(
        f"{len(rows)} embeddings ({rows.dim}-d) -> {args.out}"
        + (f"; {skipped} unreadable file(s) skipped" if skipped else "")
    )
    if args.split:
        split_metrics(rows, args.split, args.out, embedder.recall_ks)


def split_metrics(rows, split: str, out: str, ks) -> None:
    """A labelled split searched against itself: its metrics printed and its per-class CSV
    written beside the embeddings (``<out>.per_class.csv``)."""
    from dml.evaluation_steps import format_metrics
    from dml.inference.report import write_rows
    from dml.metrics.retrieval import query_results

    if split in ("query", "gallery"):
        print(
            f"note: the {split} split is searched against the other; for its metrics and "
            f"per-class results embed both and run python -m dml compare with --gallery",
            file=sys.stderr,
        )
        return
    try:
        results = query_results(rows.float32(), rows.labels, ks)
    except ValueError as error:  # no class with two images
        print(f"note: no metrics for the {split} split ({error})", file=sys.stderr)
        return
    path = os.path.splitext(out)[0] + ".per_class.csv"
    write_rows(
        [
            {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
            for row in results.per_class(ks)
        ],
        path,
    )
    print(
        f"{split} split, each image searched against the rest of it | "
        f"{format_metrics(results.metrics(ks))} | per class: {path}"
    )


def index(args) -> None:
    from dml.inference.embeddings import EmbeddingSet
    from dml.inference.index import SearchIndex

    check_outputs([args.out, args.out + ".rows.npz"], [args.embeddings])
    if args.nprobe is not None and args.kind not in ("ivf", "ivfpq"):
        raise ConfigError(f"--nprobe: a {args.kind} index has no cells to probe (ivf and ivfpq do)")
    rows = EmbeddingSet.load(args.embeddings)
    if len(rows) == 0:
        raise ConfigError(f"{args.embeddings}: 0 embeddings, there is nothing to index")
    if rows.non_finite_rows():
        raise ConfigError(
            f"{args.embeddings}: {rows.non_finite_rows()} of {len(rows)} "
            f"embeddings hold NaN or inf; nothing was indexed"
        )
    try:
        built = SearchIndex.build(rows, args.kind, args.nprobe)
    except ConfigError as error:
        raise ConfigError(f"{args.embeddings}: {error}") from None
    built.save(args.out)
    for note in built.meta.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    recall = built.meta.get("recall@10")
    print(
        f"{args.kind} index of {len(built)} rows ({built.dim}-d) -> {args.out}"
        + (
            f"; Recall@{built.meta['recall_k']} against exact search {recall:.4f} on "
            f"{built.meta['recall_sample']} sampled rows (a hit: at or inside the exact "
            f"{built.meta['recall_k']}th distance)"
            if recall is not None
            else ""
        )
    )


def search(args) -> None:
    from dml.inference.embedder import Embedder, image_files
    from dml.inference.embeddings import EmbeddingSet
    from dml.inference.index import SearchIndex
    from dml.inference.report import result_rows, write_html, write_rows

    if not args.out.endswith((".json", ".csv")):
        raise ConfigError(f"--out {args.out}: expected a .json or .csv file")
    if args.html_queries < 0:
        raise ConfigError(f"--html-queries {args.html_queries}: expected 0 (all) or more")
    check_outputs(
        [args.out, args.html],
        [
            args.index,
            args.index + ".rows.npz",
            args.embeddings,
            args.ckpt,
            args.images,
            *args.queries,
        ],
    )
    built = SearchIndex.load(args.index)
    sources = [bool(args.embeddings), bool(args.images), bool(args.queries)]
    if sum(sources) != 1:
        raise ConfigError(
            "search: give the queries as --embeddings FILE, --images DIR or "
            "image files, one of them"
        )
    unreadable = 0
    if args.embeddings:
        queries = EmbeddingSet.load(args.embeddings)
    else:
        if not args.ckpt:
            raise ConfigError("search: query images need --ckpt, the checkpoint that embeds them")
        embedder = Embedder.from_checkpoint(args.ckpt, trust_modules=args.trust_module)
        if embedder.dim != built.dim:
            raise ConfigError(
                f"--ckpt {args.ckpt}: embeds into {embedder.dim}-d, the index "
                f"{args.index} holds {built.dim}-d embeddings"
            )
        paths = image_files(args.images) if args.images else list(args.queries)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"{missing[0]}: no such image file")
        queries = embedder.embed_files(paths)
        check_model_output(queries, args.ckpt)
        unreadable = report_unreadable(queries)
    if args.embeddings and queries.non_finite_rows():
        raise ConfigError(
            f"{args.embeddings}: {queries.non_finite_rows()} of {len(queries)} "
            f"query embeddings hold NaN or inf; nothing was searched"
        )
    notes = built.set_nprobe(args.nprobe) if args.nprobe is not None else []
    if args.k < 1:
        raise ConfigError(f"--k {args.k}: expected a number of neighbours >= 1")
    if args.rerank_param and not args.rerank:
        raise ConfigError("--rerank-param: give --rerank k_reciprocal or alpha_qe too")
    if args.rerank:
        from dml.inference.rerank_search import check_rerank

        check_rerank(built, args.rerank, rerank_params(args.rerank_param))
    try:
        if args.rerank:
            from dml.inference.rerank_search import reranked_search

            hits = reranked_search(
                built,
                queries.float32(),
                args.k,
                args.rerank,
                rerank_params(args.rerank_param),
                args.exclude_self,
            )
        else:
            hits = built.search(queries.float32(), args.k, args.exclude_self, args.exact_fallback)
    except ConfigError as error:  # about the queries: name where they came from
        source = args.embeddings or args.images or "the query images"
        raise ConfigError(f"{source}: {error}") from None
    labels = built.labels if len(built.labels) and (built.labels >= 0).all() else None
    results = result_rows(
        queries.paths, queries.labels if queries.has_labels else None, hits, built.paths, labels
    )
    write_rows(results, args.out)
    if args.html:
        from dml.inference.generated_images import resolver

        source = built.meta.get("source") or {}
        images = (resolver(queries.meta), resolver(source))
        archives = (queries.meta.get("archive"), source.get("archive"))
        title = f"{len(queries)} queries against {args.index}"
        write_html(results, args.html, title, images, args.html_queries, args.out, archives)
    for note in notes + hits.notes:
        print(f"note: {note}", file=sys.stderr)
    short = len(hits.short)
    print(
        f"{len(queries)} queries x top {hits.k} -> {args.out}"
        + (f", {args.html}" if args.html else "")
        + (f"; {unreadable} unreadable query image(s) skipped" if unreadable else "")
        + (
            f"; {short} queries got fewer than {hits.k} hits (the {built.kind} index found no "
            f"more; --exact-fallback or a larger --nprobe searches further)"
            if short
            else ""
        )
    )


def rerank_params(pairs) -> dict:
    """``--rerank-param k1=20`` -> {"k1": 20}; ints stay ints."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            params[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ConfigError(f"--rerank-param {pair}: expected KEY=NUMBER, e.g. k1=20")
    return params


def export_command(args) -> None:
    from dml.inference.embedder import Embedder
    from dml.inference.export import export

    check_outputs([args.out, args.out + ".json"], [args.ckpt])
    embedder = Embedder.from_checkpoint(args.ckpt, device="cpu", trust_modules=args.trust_module)
    info = export(embedder, args.format, args.out)
    print(
        f"{args.format} -> {args.out} (preprocessing in {args.out}.json); max |export - "
        f"PyTorch| = {info['max_abs_diff_vs_pytorch']:.2e} on a check batch"
    )


def main(argv: Optional[List[str]] = None) -> int:
    from dml.errors import one_line_errors
    from dml.quiet import quiet_known_noise

    quiet_known_noise()
    args = parser().parse_args(argv)
    run = {"embed": embed, "index": index, "search": search, "export": export_command}
    return one_line_errors(run[args.command], args)
