"""The one pick among a search's scored candidates: by the proxy score, re-scored and re-ranked on val.

A search (:mod:`common.search.methods`: random, TPE, policy, policy_seeded) returns its candidates scored
by a *proxy* (:mod:`common.search.proxy`; by default minus the label-free centered-logit MSE to the dense
model on BN-calibration train images); :func:`pick` then lets top-1 on a fixed val subset decide among
the ``SearchConfig.rerank`` best of them. Only ``val`` is ever used for selection. With
``SearchConfig.rescore`` the best few are first scored again on more calibration images, so that val
sees the best by a less noisy score. Every re-score and re-rank goes through the searcher's recorder
(:meth:`common.search.searcher.Searcher.evaluate_many`), so a resumed or repeated pick reads them back.
"""

from __future__ import annotations

__all__ = ["pick"]


def pick(searcher, method: str, target: float, hist: list[dict]) -> tuple[dict, float | None, dict]:
    """The one choice among a search's scored candidates, its val top-1 (when measured), and the
    re-scores (``{}`` without ``config.rescore``).

    ``searcher``: the :class:`common.search.searcher.Searcher` whose search made them (not annotated:
    the import would be a cycle). ``hist``: candidates as the searches make them (``index``, ``score``,
    ``plan``); :meth:`common.search.searcher.Searcher.run` picks among a search's, and a logged search's
    candidates can be chosen among again (``studies/matched_macs/matched_macs.py``), re-ranks already in
    the recorder being read back, not measured.

    With ``config.rescore`` the ``rescore`` best-scored candidates are scored again on
    ``rescore_images`` calibration images (recorded as ``rescore`` records) and ranked by that
    instead (ties: the better search score, then the earlier candidate); the re-scores come back as
    ``{"calib_images", "indices", "scores"}`` in the order of the search scores, and the pick's
    ``"picked"``. The best wins when the score is val top-1 already or ``config.rerank`` is 1; else
    val top-1 decides among the ``config.rerank`` best-ranked ones (ties: the better (re-)score, then
    the earlier candidate).
    """
    ranked = sorted(hist, key=lambda h: (-h["score"], h["index"]))
    if searcher.proxy == "top1":
        return ranked[0], None, {}
    again: dict[int, float] = {}
    if searcher.config.rescore:
        pool = ranked[: searcher.config.rescore]
        n = searcher.rescorer.calib_images
        keys = [{"method": method, "target": float(target), "index": h["index"]} for h in pool]
        values = searcher.evaluate_many([(h["plan"], "rescore", k, {"calib_images": n}) for h, k in zip(pool, keys)])
        again = {h["index"]: v for h, v in zip(pool, values)}
        ranked = sorted(pool, key=lambda h: (-again[h["index"]], -h["score"], h["index"]))
        searcher.progress(
            f"{method} x{target:g}: the {len(pool)} best-scored candidates on {n} calibration images: "
            + ", ".join(f"#{h['index']} {again[h['index']]:.5g}" for h in ranked)
        )

    def rescored(best: dict) -> dict:
        if not again:
            return {}
        return {
            "calib_images": searcher.rescorer.calib_images,
            "indices": list(again),
            "scores": list(again.values()),
            "picked": again[best["index"]],
        }

    if searcher.config.rerank == 1:
        return ranked[0], None, rescored(ranked[0])
    top = ranked[: searcher.config.rerank]
    vals = searcher.evaluate_many(
        [(h["plan"], "rerank", {"method": method, "target": float(target), "index": h["index"]}, None) for h in top]
    )
    k = max(range(len(top)), key=lambda i: (vals[i], again.get(top[i]["index"], top[i]["score"]), -top[i]["index"]))
    searcher.progress(
        f"{method} x{target:g}: val top-1 of the {len(top)} best-{'re' if again else ''}scored candidates "
        + ", ".join(f"#{h['index']} {v:.4f}" for h, v in zip(top, vals))
    )
    return top[k], vals[k], rescored(top[k])
