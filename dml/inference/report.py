"""Search results as files: JSON or CSV rows, and one self-contained HTML page.

The page shows each query with its k neighbours and their similarities; where the labels of
both are known, a neighbour of the query's class is framed green and any other red. Images are
embedded as small JPEG thumbnails (data URIs), so the page can be mailed or opened anywhere;
generated images (the synthetic data, whose items have no file) are made again where the
embedding file says how (``dml.inference.generated_images``); any other path that is not an
image file is shown as its name.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import numpy as np

from dml.atomic_files import write_text_atomic

if TYPE_CHECKING:
    from dml.inference.index import Hits


def result_rows(
    query_paths: List[str],
    query_labels: Optional[np.ndarray],
    hits: "Hits",
    paths: List[str],
    labels: Optional[np.ndarray],
) -> List[Dict]:
    """One dict per (query, neighbour): the rows of ``dml.inference.index.Hits``, which holds
    real rows and finite cosines only (a query with fewer hits has fewer dicts)."""
    rows = []
    for q, path in enumerate(query_paths):
        for rank, (j, s) in enumerate(zip(hits.rows[q].tolist(), hits.similarities[q].tolist())):
            row = {
                "query": path,
                "query_row": q,
                "rank": rank + 1,
                "path": paths[j],
                "row": int(j),
                "similarity": round(float(s), 6),
            }
            if hits.rerank_distances is not None:
                row["rerank_distance"] = round(float(hits.rerank_distances[q][rank]), 6)
            if query_labels is not None and labels is not None and query_labels[q] >= 0:
                row["query_label"], row["label"] = int(query_labels[q]), int(labels[j])
                row["match"] = bool(query_labels[q] == labels[j])
            rows.append(row)
    return rows


def write_rows(rows: List[Dict], path: str) -> None:
    """``.json`` (a list of objects) or ``.csv``, written whole or not at all."""
    tmp = f"{path}.{os.getpid()}.partial"
    try:
        with open(tmp, "w", newline="") as f:
            if path.endswith(".json"):
                json.dump(rows, f, indent=1, allow_nan=False)  # strict JSON
            elif path.endswith(".csv"):
                fields = list(dict.fromkeys(k for row in rows for k in row))
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            else:
                raise ValueError(f"--out {path}: expected a .json or .csv file")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=4)
def open_archive(path: str, modified: float):
    """The zip file ``path`` opened once per page, not once per thumbnail (reading the
    directory of Omniglot's zip took 20 ms); ``modified`` (its mtime) keys a changed file anew."""
    import zipfile

    return zipfile.ZipFile(path)


def thumbnail(path: str, size: int = 112, archive: Optional[str] = None) -> Optional[str]:
    """A data URI of a JPEG thumbnail of an image file, or of the member ``path`` of the zip
    ``archive`` (Omniglot's splits); None when there is no readable image."""
    from dml.data.image_list import open_image

    try:
        if os.path.isfile(path):
            img = open_image(path)
        elif isinstance(archive, str) and os.path.isfile(archive):
            with open_archive(archive, os.path.getmtime(archive)).open(path) as f:
                img = open_image(f)
        else:
            return None
        return image_uri(img, size)
    except Exception:  # noqa: BLE001 - shown as its name instead
        return None


def image_uri(img, size: int = 112) -> str:
    """A data URI of ``img`` (PIL) as a JPEG thumbnail; a small image is enlarged (nearest
    neighbour, so its pixels stay visible) to fit ``size``."""
    img = img.convert("RGB")  # upright, as a viewer shows it (EXIF)
    scale = size // max(img.size)
    if scale > 1:
        img = img.resize((img.size[0] * scale, img.size[1] * scale), resample=0)
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def tile(
    path: str,
    caption: str,
    frame: str,
    cache: Dict[Any, Optional[str]],
    archive: Optional[str] = None,
    images: Optional[Callable[[str], Any]] = None,
) -> str:
    """One framed thumbnail: the image file ``path``, a member of the zip ``archive``, or the
    image ``images(path)`` gives (generated data, ``dml.inference.generated_images``)."""
    key = (path, archive, id(images))  # the same name in two sources: two images
    if key not in cache:
        cache[key] = thumbnail(path, archive=archive)
        if cache[key] is None and images is not None:
            img = images(path)
            cache[key] = None if img is None else image_uri(img)
    uri = cache[key]
    name = html.escape(os.path.basename(path) or path)
    body = f'<img src="{uri}" alt="{name}">' if uri else f'<div class="name">{name}</div>'
    return (
        f'<figure style="border-color:{frame}" title="{html.escape(path)}">{body}'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def write_html(
    rows: List[Dict],
    path: str,
    title: str = "dml search",
    images: tuple = (None, None),
    max_queries: int = 0,
    listed_in: str = "",
    archives: tuple = (None, None),
) -> None:
    """The page of ``rows`` (``result_rows``): each query (by ``query_row``) with its hits, the
    first ``max_queries`` of them (0: all; a page of every query of a test split would weigh
    hundreds of MB); ``listed_in`` names the file that holds them all. ``images``: for the
    queries and the neighbours, a function from a path to its image where the paths are not
    files (``dml.inference.generated_images.resolver``), or None; ``archives``: the zip files
    their paths are members of (Omniglot's splits), or None."""
    by_query: Dict[int, List[Dict]] = {}
    for row in rows:
        by_query.setdefault(row["query_row"], []).append(row)
    shown = list(by_query.items())[: max_queries or None]
    cache: Dict[Any, Optional[str]] = {}
    lines = [
        query_row(hits[0]["query"], "query", hits, cache, archives, images) for _, hits in shown
    ]
    count = f"{len(by_query)} queries"
    if len(shown) < len(by_query):
        count += f", the first {len(shown)} shown" + (f" (all in {listed_in})" if listed_in else "")
    write_page(path, title, f"<p>{html.escape(count)}; {FRAMES}</p>\n" + "\n".join(lines))


FRAMES = "frames: green = same class as the query, red = another class, grey = unknown."


def query_row(
    query: str,
    caption: str,
    hits: List[Dict],
    cache: Dict[Any, Optional[str]],
    archives: tuple = (None, None),
    images: tuple = (None, None),
) -> str:
    """One query's tile and its neighbours' (dicts with "path", "rank", "similarity" or
    "caption", and "match" where the labels are known); ``archives``: the zip files the query
    and the neighbours are members of, if they are; ``images``: their generated images'
    resolvers, if any."""
    cells = [tile(query, caption, "#444", cache, archives[0], images[0])]
    for hit in hits:
        frame = "#888" if "match" not in hit else ("#2a2" if hit["match"] else "#d22")
        label = hit.get("caption") or f"{hit['rank']}: {hit['similarity']:.3f}"
        cells.append(tile(hit["path"], label, frame, cache, archives[1], images[1]))
    return f'<div class="row">{"".join(cells)}</div>'


def write_page(path: str, title: str, body: str) -> None:
    """A self-contained HTML page (the tiles' style), written whole or not at all."""
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.row {{ display: flex; gap: 6px; margin-bottom: 10px; align-items: flex-start; }}
figure {{ margin: 0; border: 4px solid; padding: 2px; width: 116px; text-align: center; }}
figure img {{ max-width: 112px; max-height: 112px; }}
figcaption {{ font-size: 11px; }}
.name {{ width: 112px; height: 60px; font-size: 10px; overflow-wrap: anywhere; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
</style></head><body>
<h3>{html.escape(title)}</h3>
{body}
</body></html>
"""
    write_text_atomic(path, page)


def html_table(rows: List[Dict], columns: List[str]) -> str:
    """A plain HTML table of ``rows`` (floats in [0, 1] shown in %)."""

    def cell(v):
        return f"{100 * v:.1f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
