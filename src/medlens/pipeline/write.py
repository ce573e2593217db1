"""Writing an `Outcome` to its folder: the chosen formats and provenance.json as one set (see io.output), with
the region outlined and its scores, the loading notes, and the model's source recorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from medlens.io.output import write_explanation
from medlens.pipeline.run import Outcome


def write_outcome(outcome: Outcome, folder: Union[str, Path], *, formats: Optional[Sequence[str]] = None,
                  model_source: Optional[Mapping[str, Any]] = None,
                  extra_provenance: Optional[Mapping[str, Any]] = None,
                  input_sha256: Optional[str] = None) -> list[Path]:
    """Write one explained input into `folder` (formats default to the request's); returns the paths written.
    `input_sha256`: the source's digest when the caller already has it (see `write_explanation`)."""
    extra = dict(extra_provenance or {})
    region = outcome.region_provenance()
    if region is not None:
        extra["region"] = region
    if outcome.seconds:
        extra["pipeline_seconds"] = {k: round(v, 6) for k, v in outcome.seconds.items()}
    return write_explanation(
        outcome.result, folder,
        display=outcome.prepared.display,
        input_file=outcome.source,
        loading_notes=outcome.notes,
        model_source=model_source,
        extra_provenance=extra,
        formats=formats if formats is not None else outcome.formats,
        region=outcome.region.cpu().numpy() if outcome.region is not None else None,
        scan=outcome.prepared.scan,
        signed=outcome.signed,
        notes_out=outcome.notes,  # formats or DICOM objects skipped for this input: in the batch manifest too
        scan_region=outcome.picture_region,  # made only if a picture is drawn
        segmentation_logits=outcome.segmentation_logits,  # the DICOM Segmentation's predicted mask
        input_sha256=input_sha256,
    )

