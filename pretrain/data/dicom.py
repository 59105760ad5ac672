"""DICOM reading that keeps stored values exact and lets no identifying header value out.

Only a whitelist of technical fields reaches the record (modality, photometric, bits, rescale, window,
frame index, size); the patient becomes a salted hash. Header values are never put into exception
messages or logs: pydicom's own warnings (which may quote values) are silenced during reading and
our error messages are scrubbed against the file's PHI values (PHI_KEYWORDS, PN/DA/DT/TM, UIDs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import config as dicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from pretrain.data.readers import DecodedImage, UnreadableImageError, make_record
from pretrain.data.windowing import WINDOW_PRESETS

logger = logging.getLogger(__name__)

# DICOM PS3.15 Annex E basic confidentiality profile, the attributes common in image objects.
PHI_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
        "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "PatientAddress",
        "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientNames",
        "OtherPatientIDsSequence", "IssuerOfPatientID", "MedicalRecordLocator", "MilitaryRank",
        "BranchOfService", "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
        "PatientInsurancePlanCodeSequence", "PatientReligiousPreference", "AccessionNumber",
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
        "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
        "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
        "RequestingPhysician", "ScheduledPerformingPhysicianName", "OperatorsName", "StudyID",
        "StudyDescription", "SeriesDescription", "ProtocolName", "StationName",
        "DeviceSerialNumber", "ContentCreatorName", "ImageComments", "FrameComments",
        "DerivationDescription", "RequestAttributesSequence", "PerformedProcedureStepID",
        "PerformedProcedureStepDescription", "ScheduledProcedureStepID", "RequestedProcedureID",
        "AdmissionID", "AdmittingDiagnosesDescription", "CurrentPatientLocation", "PatientState",
        "ResponsibleOrganization", "ResponsiblePerson", "DetectorID", "PlateID", "CassetteID",
        "GantryID", "SourceSerialNumber", "DeviceUID", "InstanceCreatorUID", "StorageMediaFileSetUID",
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "MediaStorageSOPInstanceUID",
        "FrameOfReferenceUID", "SynchronizationFrameOfReferenceUID", "ReferencedSOPInstanceUID",
        "IrradiationEventUID", "TimezoneOffsetFromUTC",
    }
)  # fmt: skip
SALT_ENV = "MEDSSL_PATIENT_SALT"
SALT_FILE = ".patient_salt"
PHI_VRS = frozenset({"PN", "DA", "DT", "TM", "UI"})
_CODE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def _is_public_uid(value: str) -> bool:
    """Standard UIDs (SOP classes, transfer syntaxes) identify nobody and stay allowed."""
    from pydicom._uid_dict import UID_dictionary

    return value in UID_dictionary


def phi_values(ds: Dataset) -> set[str]:
    """Every identifying string of a dataset (PHI keywords, names, dates, times, instance UIDs)."""
    found: set[str] = set()

    def visit(dataset: Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value or []:
                    visit(item)
                continue
            if elem.keyword not in PHI_KEYWORDS and elem.VR not in PHI_VRS:
                continue
            values = elem.value if elem.VM > 1 else [elem.value]
            for value in values:
                text = str(value).strip() if value is not None else ""
                if not text or (elem.VR == "UI" and _is_public_uid(text)):
                    continue
                found.add(text)
                if elem.VR == "PN":  # components appear separately in some outputs
                    found.update(p for p in re.split(r"[\^=]", text) if p.strip())

    visit(ds)
    if getattr(ds, "file_meta", None) is not None:
        visit(ds.file_meta)
    return found


def scrub(text: str, phi: set[str]) -> str:
    """Replace any PHI value in a message (longest first, so parts of names go too)."""
    for value in sorted(phi, key=len, reverse=True):
        if len(value) >= 2:
            text = text.replace(value, "<redacted>")
    return text


def patient_key(patient_id: Any, salt: str | None) -> str | None:
    """Salted SHA-256 of PatientID: groups a patient's images without revealing who they are."""
    text = "" if patient_id is None else str(patient_id).strip()
    if not text or salt is None:
        return None
    return hashlib.sha256(f"{salt}\x00{text}".encode()).hexdigest()[:16]


def resolve_patient_salt(explicit: str | None, state_dir: str | Path) -> str:
    """explicit -> $MEDSSL_PATIENT_SALT -> state_dir/.patient_salt (random, made once, mode 0600).

    One salt per output keeps a patient's images linked across resumed runs; a shared salt links
    them across datasets. The salt never goes into records, configs or logs."""
    path = Path(state_dir) / SALT_FILE
    if explicit or os.environ.get(SALT_ENV) or path.exists():
        return str(explicit or os.environ.get(SALT_ENV) or path.read_text().strip())
    salt = secrets.token_hex(32)
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(salt + "\n")
    os.replace(tmp, path)
    logger.warning("no patient salt given: generated a random one in %s (mode 0600). Keep it "
                   "private; pass the same salt (patient_salt=... or $%s) to link patients across "
                   "datasets.", path, SALT_ENV)  # fmt: skip
    return salt


def _code(ds: Dataset, keyword: str, default: str) -> str:
    value = str(ds.get(keyword, "") or "").strip().upper()
    return value if _CODE.match(value) else default


def _first_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


@contextmanager
def _quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Silence pydicom's validation warnings/logs during a read: they quote header values."""
    old_mode = dicom_config.settings.reading_validation_mode
    pd_logger = logging.getLogger("pydicom")
    old_level = pd_logger.level
    dicom_config.settings.reading_validation_mode = dicom_config.IGNORE
    pd_logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        dicom_config.settings.reading_validation_mode = old_mode
        pd_logger.setLevel(old_level)


def _iter_frames(ds: Dataset) -> Iterator[tuple[np.ndarray, str]]:
    """Decoded frames (stored values) and the photometric interpretation they are in."""
    from pydicom.pixels import convert_color_space, get_decoder

    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    for arr, props in decoder.iter_array(ds, raw=True):
        photometric = str(props.get("photometric_interpretation") or "").strip().upper()
        if not _CODE.match(photometric):  # a header string we do not trust into records
            photometric = "RGB" if arr.ndim == 3 else "MONOCHROME2"
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            arr = convert_color_space(arr, photometric, "RGB")
            photometric = "RGB"
        yield arr, photometric


def _frame_to_record_fields(
    ds: Dataset, arr: np.ndarray, photometric: str
) -> tuple[np.ndarray, dict[str, Any]]:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    fields: dict[str, Any] = {"bits": int(ds.get("BitsStored") or 8 * arr.dtype.itemsize)}
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        return arr, {"photometric": "RGB", "bits": 8 * arr.dtype.itemsize}
    if arr.ndim == 3:  # colour: no modality LUT or window applies
        return arr, {"photometric": photometric, "bits": 8 * arr.dtype.itemsize}
    fields["photometric"] = photometric
    fields["invert"] = photometric == "MONOCHROME1"
    if ds.get("ModalityLUTSequence"):  # non-linear LUT: store its output (integers) instead
        arr = apply_modality_lut(arr, ds)
        fields["modality_lut_applied"] = True
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        fields["slope"] = float(ds.RescaleSlope)
        fields["intercept"] = float(ds.RescaleIntercept)
    return arr, fields


def _window(ds: Dataset, modality: str, ct_window_preset: str | None, use_tags: bool) -> dict:
    if use_tags:
        center = _first_float(ds.get("WindowCenter"))
        width = _first_float(ds.get("WindowWidth"))
        if center is not None and width is not None and width >= 1:
            return {"window_center": center, "window_width": width}
    if modality == "CT" and ct_window_preset:
        if ct_window_preset not in WINDOW_PRESETS:
            raise ValueError(f"unknown CT window preset {ct_window_preset!r}")
        center, width = WINDOW_PRESETS[ct_window_preset]
        return {"window_center": center, "window_width": width, "window_preset": ct_window_preset}
    return {}  # MR/US/...: percentile normalisation at float time


def read_dicom(
    path: str | Path,
    *,
    patient_salt: str | None = None,
    ct_window_preset: str | None = "mediastinum",
    use_window_tags: bool = True,
) -> list[DecodedImage]:
    """All frames of a DICOM file as stored values + whitelisted record (one sample per frame)."""
    path = Path(path)
    with _quiet_pydicom() as caught:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError as exc:
            raise UnreadableImageError(f"{path}: not a DICOM file (no valid header)") from exc
        except Exception as exc:  # header values must not leak: report the error type only
            raise UnreadableImageError(
                f"{path}: corrupt or truncated DICOM header ({type(exc).__name__})"
            ) from exc
        try:
            phi = phi_values(ds)
        except Exception as exc:
            raise UnreadableImageError(
                f"{path}: corrupt or truncated DICOM header ({type(exc).__name__})"
            ) from exc
        if (
            "PixelData" not in ds
            and "FloatPixelData" not in ds
            and "DoubleFloatPixelData" not in ds
        ):
            raise UnreadableImageError(f"{path}: DICOM object has no pixel data (not an image)")
        modality = _code(ds, "Modality", "OT")
        try:
            n_frames = int(ds.get("NumberOfFrames") or 1)
            window = _window(ds, modality, ct_window_preset, use_window_tags)
            images: list[DecodedImage] = []
            for index, (raw, photometric) in enumerate(_iter_frames(ds)):
                arr, fields = _frame_to_record_fields(ds, raw, photometric)
                window_fields = {} if arr.ndim == 3 else window
                record = make_record(
                    np.ascontiguousarray(arr),
                    modality=modality,
                    index_in_source=index,
                    n_in_source=n_frames,
                    patient=patient_key(ds.get("PatientID"), patient_salt),
                    **fields,
                    **window_fields,
                )
                images.append(DecodedImage(np.ascontiguousarray(arr), record))
        except Exception as exc:
            reason = scrub(f"{type(exc).__name__}: {exc}", phi)[:300]
            raise UnreadableImageError(f"{path}: cannot decode pixel data: {reason}") from exc
    if caught:
        logger.debug("%s: %d pydicom warning(s) silenced while reading", path, len(caught))
    if not images:
        raise UnreadableImageError(f"{path}: DICOM pixel data holds no frames")
    if len(images) != n_frames:
        for image in images:
            image.record["n_in_source"] = len(images)
    return images
