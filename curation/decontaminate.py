"""Step d: remove from the pool every image that could leak an evaluation set into pretraining.

Three reasons, each recorded per removed image: pixel-identical to an eval image (sha256), a copy
of one (aligned copy score within the decontamination threshold, looser than dedup's because a
missed contamination inflates every reported metric while a lost pool image costs little), or
the same patient as an eval image (salted patient hash from ingest): two scans of one patient are
not copies, but a model pretrained on one has seen the other's anatomy. Patient keys are compared
only when both sides were made with the same site key (their records' `key_fingerprint`): keys made
with two keys never match, so the comparison is refused rather than silently finding nothing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from curation.dedup import Pairs, copy_pairs
from curation.embed import short_side
from pretrain.privacy import check_same_key

logger = logging.getLogger(__name__)


@dataclass
class Contamination:
    """Pool indices to drop and, per index, why (reason, eval set, eval key, score)."""

    removed: dict[int, dict] = field(default_factory=dict)
    pairs: list[Pairs] = field(default_factory=list)

    def add(
        self, index: int, reason: str, eval_set: str, eval_key: str, score: float | None = None
    ) -> None:
        if index not in self.removed:
            self.removed[int(index)] = {
                "reason": reason,
                "eval_set": eval_set,
                "eval_key": eval_key,
                "score": None if score is None else round(float(score), 4),
            }


def decontaminate(
    pool_thumbs: np.ndarray,
    pool_records: list[dict],
    active: np.ndarray,
    eval_sets: list[tuple[str, np.ndarray, list[dict]]],
    cfg,
    index_cfg: dict,
    *,
    progress: bool = True,
) -> Contamination:
    """Check pool images `active` (indices) against every (name, thumbs, records) eval set."""
    found = Contamination()
    active = np.asarray(active, dtype=np.int64)
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i in active:
        by_hash[pool_records[i]["sha256"]].append(int(i))
    for name, thumbs, records in eval_sets:
        if cfg.exact:
            for rec in records:
                for i in by_hash.get(rec["sha256"], []):
                    found.add(i, "exact", name, rec["key"], 1.0)
        if cfg.patients:
            patients = {r["patient"]: r["key"] for r in records if r.get("patient")}
            if patients:
                check_same_key(
                    {
                        "the pool": _fingerprints(pool_records, active),
                        f"eval set {name}": _fingerprints(records),
                    },
                    "patient decontamination",
                )
            for i in active:
                p = pool_records[i].get("patient")
                if p and p in patients:
                    found.add(int(i), "patient", name, patients[p])
        if len(active) and len(thumbs):
            pairs = copy_pairs(
                np.asarray(pool_thumbs[active]),
                np.asarray(thumbs),
                cfg,
                index_cfg,
                res_q=short_side(pool_records)[active],
                res_db=short_side(records),
                progress=progress,
            )
            pairs.a = active[pairs.a]
            found.pairs.append(pairs)
            hit = pairs.copies(float(cfg.threshold), float(cfg.local_threshold))
            for a, b, s in zip(pairs.a[hit], pairs.b[hit], pairs.ncc[hit]):
                found.add(int(a), "copy", name, records[b]["key"], s)
        logger.info("eval set %s: %d pool images removed so far", name, len(found.removed))
    return found


def _fingerprints(records: list[dict], index: np.ndarray | None = None) -> set[str | None]:
    """Site-key fingerprints of the records that carry a patient key."""
    chosen = records if index is None else (records[i] for i in index)
    return {r.get("key_fingerprint") for r in chosen if r.get("patient")}
