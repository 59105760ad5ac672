"""DICOM reading that keeps stored values exact and lets no identifying header value out.

Only a whitelist of technical fields reaches the record (modality, photometric, bits, rescale, window,
frame index, size); the patient becomes a keyed hash under the site key (pretrain/privacy.py). Pixels
keep BitsStored bits only (no overlay planes); text burned into them is rejected or masked. Header values are never put into exception
messages or logs: pydicom's own warnings (which may quote values) are silenced during reading and
our error messages are scrubbed against the file's PHI values (PHI_KEYWORDS, PN/DA/DT/TM, UIDs).
"""

from __future__ import annotations

import logging
import re
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
from pretrain.privacy import SiteKey

logger = logging.getLogger(__name__)

# DICOM PS3.15 Annex E basic confidentiality profile, the attributes common in image objects.
PHI_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientAge",
        "PatientSex",
        "PatientSize",
        "PatientWeight",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientMotherBirthName",
        "OtherPatientIDs",
        "OtherPatientNames",
        "OtherPatientIDsSequence",
        "IssuerOfPatientID",
        "MedicalRecordLocator",
        "MilitaryRank",
        "BranchOfService",
        "EthnicGroup",
        "Occupation",
        "AdditionalPatientHistory",
        "PatientComments",
        "PatientInsurancePlanCodeSequence",
        "PatientReligiousPreference",
        "AccessionNumber",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "PhysiciansOfRecord",
        "RequestingPhysician",
        "ScheduledPerformingPhysicianName",
        "OperatorsName",
        "StudyID",
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "StationName",
        "DeviceSerialNumber",
        "ContentCreatorName",
        "ImageComments",
        "FrameComments",
        "DerivationDescription",
        "RequestAttributesSequence",
        "PerformedProcedureStepID",
        "PerformedProcedureStepDescription",
        "ScheduledProcedureStepID",
        "RequestedProcedureID",
        "AdmissionID",
        "AdmittingDiagnosesDescription",
        "CurrentPatientLocation",
        "PatientState",
        "ResponsibleOrganization",
        "ResponsiblePerson",
        "DetectorID",
        "PlateID",
        "CassetteID",
        "GantryID",
        "SourceSerialNumber",
        "DeviceUID",
        "InstanceCreatorUID",
        "StorageMediaFileSetUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "MediaStorageSOPInstanceUID",
        "FrameOfReferenceUID",
        "SynchronizationFrameOfReferenceUID",
        "ReferencedSOPInstanceUID",
        "IrradiationEventUID",
        "TimezoneOffsetFromUTC",
    }
)
BURNED_IN_POLICIES = ("reject", "keep", "mask")
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


def burned_in_annotation(ds: Dataset) -> bool:
    """The header says text is burned into the pixels (BurnedInAnnotation=YES)."""
    return str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"


def burned_in_regions(ds: Dataset) -> list[tuple[int, int, int, int]] | None:
    """Rectangles (x0, y0, x1, y1) to black out, from deid's header rules (RSNA CTP's filter
    script); None when a rule flags the image but names no region, so it cannot be masked."""
    import contextlib
    import io

    from deid.dicom.pixels import has_burned_pixels

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = has_burned_pixels(ds)  # deid's bot prints header values: keep them off the logs
    boxes: list[tuple[int, int, int, int]] = []
    for item in result.get("results", []):
        for keep, coords in item.get("coordinates", []):
            for box in coords if isinstance(coords, list) else [coords]:
                if str(keep) == "0" and isinstance(box, str) and box.lower() != "all":
                    x0, y0, x1, y1 = (int(v) for v in box.split(","))
                    boxes.append((x0, y0, x1, y1))
                elif str(keep) == "0":  # "all": the whole image is text
                    return None
    return boxes or None


def _mask_boxes(
    arr: np.ndarray, boxes: list[tuple[int, int, int, int]], invert: bool
) -> np.ndarray:
    """Black out each box: the lowest value, or the highest for MONOCHROME1 (inverted)."""
    arr, fill = arr.copy(), arr.max() if invert else arr.min()
    for x0, y0, x1, y1 in boxes:
        arr[y0:y1, x0:x1] = fill
    return arr


def stored_bits_only(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """Clear the bits above BitsStored: retired overlay planes (60xx,0102) can live there."""
    if arr.dtype.kind not in "iu" or not 0 < bits_stored < 8 * arr.itemsize:
        return arr
    if arr.dtype.kind == "u":
        return arr & np.array((1 << bits_stored) - 1, dtype=arr.dtype)
    shift = 8 * arr.itemsize - bits_stored
    return (arr << shift) >> shift  # drops the high bits and sign-extends the top stored bit


def _burned_in_boxes(
    ds: Dataset, path: Path, policy: str
) -> list[tuple[int, int, int, int]] | None:
    """The boxes to mask under `policy`, or raise when the file must be rejected."""
    if policy not in BURNED_IN_POLICIES:
        raise ValueError(f"burned_in must be one of {BURNED_IN_POLICIES}, got {policy!r}")
    burned = burned_in_annotation(ds)
    if policy == "keep" or (policy == "reject" and not burned):
        return None
    if policy == "reject":
        raise UnreadableImageError(
            f"{path}: burned-in annotation (BurnedInAnnotation=YES); burned_in=mask or "
            "burned_in=keep ingests it"
        )
    boxes = burned_in_regions(ds)
    if burned and boxes is None:
        raise UnreadableImageError(
            f"{path}: burned-in annotation (BurnedInAnnotation=YES) and no deid rule names its "
            "region for this device, so it cannot be masked"
        )
    return boxes


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
    site_key: SiteKey | None = None,
    ct_window_preset: str | None = "mediastinum",
    use_window_tags: bool = True,
    burned_in: str = "reject",
) -> list[DecodedImage]:
    """All frames of a DICOM file as stored values + whitelisted record (one sample per frame).

    site_key: makes the patient hash (None: no patient key). burned_in: what to do with text
    burned into the pixels: `reject` files whose header says so, `keep` them, or `mask` the
    regions deid's rules name (a flagged file with no named region is rejected)."""
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
        boxes = _burned_in_boxes(ds, path, burned_in)
        try:
            n_frames = int(ds.get("NumberOfFrames") or 1)
            window = _window(ds, modality, ct_window_preset, use_window_tags)
            images: list[DecodedImage] = []
            bits_stored = int(ds.get("BitsStored") or 0)
            for index, (raw, photometric) in enumerate(_iter_frames(ds)):
                arr, fields = _frame_to_record_fields(
                    ds, stored_bits_only(raw, bits_stored), photometric
                )
                if boxes:
                    arr = _mask_boxes(arr, boxes, bool(fields.get("invert")))
                    fields["burned_in_masked"] = True
                window_fields = {} if arr.ndim == 3 else window
                record = make_record(
                    np.ascontiguousarray(arr),
                    modality=modality,
                    index_in_source=index,
                    n_in_source=n_frames,
                    patient=site_key.patient(ds.get("PatientID")) if site_key else None,
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
