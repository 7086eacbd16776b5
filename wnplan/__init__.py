"""wnplan: per-layer noise robustness profiles and deployment plans for noisy accelerators.

The public API mirrors the command line:

    from wnplan import AllocationSettings, NoiseSpec, ProfileSettings, allocate, check, profile, write_record
    record = profile("model.onnx", "fashion-mnist", ProfileSettings(noise=NoiseSpec("additive")))
    write_record(record, "profile", "wnplan-profile.json")
    plan = allocate(record, AllocationSettings(budget=22), profile_path="wnplan-profile.json")
    result = check(plan)
"""

from wnplan._version import __version__
from wnplan.data import Dataset, load_data
from wnplan.errors import (
    DataError,
    FileFormatError,
    ModelError,
    SettingsError,
    SiteError,
    StoreError,
    WnplanError,
)
from wnplan.fit import CurvePoint, FitResult, fit_curve, predict_accuracy
from wnplan.models import Model, Site, load_model
from wnplan.noise import NoiseSpec
from wnplan.plan import AllocationSettings, allocate
from wnplan.profiler import ProfileSettings, profile
from wnplan.records import read_record, write_record
from wnplan.simulate import check

__all__ = [
    "AllocationSettings",
    "CurvePoint",
    "DataError",
    "Dataset",
    "FileFormatError",
    "FitResult",
    "Model",
    "ModelError",
    "NoiseSpec",
    "ProfileSettings",
    "SettingsError",
    "Site",
    "SiteError",
    "StoreError",
    "WnplanError",
    "__version__",
    "allocate",
    "check",
    "fit_curve",
    "load_data",
    "load_model",
    "predict_accuracy",
    "profile",
    "read_record",
    "write_record",
]
