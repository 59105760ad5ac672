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


def contamination_pairs(
    pool_thumbs: np.ndarray,
    pool_records: list[dict],
    active: np.ndarray,
    eval_sets: list[tuple[str, np.ndarray, list[dict]]],
    cfg,
    index_cfg: dict,
    *,
    part: tuple[int, int] | None = None,
    progress: bool = True,
) -> list[Pairs]:
    """Verified copy candidates between pool images `active` (`a`: pool index) and each eval set
    (`b`: eval index): the expensive half of decontamination, split into array tasks by `part`
    (see dedup.merge_pairs)."""
    active = np.asarray(active, dtype=np.int64)
    found = []
    for _, thumbs, records in eval_sets:
        if not (len(active) and len(thumbs)):
            found.append(Pairs.empty())
            continue
        pairs = copy_pairs(
            np.asarray(pool_thumbs[active]),
            np.asarray(thumbs),
            cfg,
            index_cfg,
            res_q=short_side(pool_records)[active],
            res_db=short_side(records),
            part=part,
            progress=progress,
        )
        pairs.a = active[pairs.a]
        found.append(pairs)
    return found


def decontaminate(
    pool_records: list[dict],
    active: np.ndarray,
    eval_sets: list[tuple[str, np.ndarray, list[dict]]],
    cfg,
    pairs: list[Pairs],
) -> Contamination:
    """Check pool images `active` (indices) against every (name, thumbs, records) eval set, with
    `pairs` from contamination_pairs (one Pairs per eval set)."""
    check_patient_keys(pool_records, active, eval_sets, cfg)
    found = Contamination()
    active = np.asarray(active, dtype=np.int64)
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i in active:
        by_hash[pool_records[i]["sha256"]].append(int(i))
    for (name, _, records), set_pairs in zip(eval_sets, pairs, strict=True):
        if cfg.exact:
            for rec in records:
                for i in by_hash.get(rec["sha256"], []):
                    found.add(i, "exact", name, rec["key"], 1.0)
        if cfg.patients:
            patients = {r["patient"]: r["key"] for r in records if r.get("patient")}
            slides = {r["slide"]: r["key"] for r in records if r.get("slide")}
            for i in active:
                p = pool_records[i].get("patient")
                if p and p in patients:
                    found.add(int(i), "patient", name, patients[p])
                slide = pool_records[i].get("slide")  # every tile of an eval slide goes
                if slide and slide in slides:
                    found.add(int(i), "slide", name, slides[slide])
        found.pairs.append(set_pairs)
        hit = set_pairs.copies(float(cfg.threshold), float(cfg.local_threshold))
        for a, b, s in zip(set_pairs.a[hit], set_pairs.b[hit], set_pairs.ncc[hit]):
            found.add(int(a), "copy", name, records[b]["key"], s)
        logger.info("eval set %s: %d pool images removed so far", name, len(found.removed))
    return found


def check_patient_keys(
    pool_records: list[dict],
    active: np.ndarray,
    eval_sets: list[tuple[str, np.ndarray, list[dict]]],
    cfg,
) -> None:
    """Refuse (before any search) patient keys made with two site keys: they never match."""
    if not cfg.patients:
        return
    for name, _, records in eval_sets:
        if any(r.get("patient") for r in records):
            check_same_key(
                {
                    "the pool": _fingerprints(pool_records, active),
                    f"eval set {name}": _fingerprints(records),
                },
                "patient decontamination",
            )


def _fingerprints(records: list[dict], index: np.ndarray | None = None) -> set[str | None]:
    """Site-key fingerprints of the records that carry a patient key."""
    chosen = records if index is None else (records[i] for i in index)
    return {r.get("key_fingerprint") for r in chosen if r.get("patient")}
