"""Tests for site selection (wnplan.sites.select_sites) on hand-made and exported site lists."""

from __future__ import annotations

import pytest
import torch
from conftest import SharedLinearNet, export_pt2

from wnplan.errors import SiteError
from wnplan.models import Site, load_model
from wnplan.sites import select_sites

SITES = (
    Site(0, "input", "input", (1, 6, 6)),
    Site(1, "stem", "conv2d", (4, 6, 6), 40, "stem"),
    Site(2, "act", "relu", (4, 6, 6), 0, "act"),
    Site(3, "block.conv1", "conv2d", (4, 6, 6), 148, "block.conv1"),
    Site(4, "block/relu_1", "relu", (4, 6, 6), 0, "block"),
    Site(5, "norm", "batch_norm", (4, 6, 6), 8, "norm"),
    Site(6, "fc", "linear", (5,), 725, "fc"),
)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (None, [0, 1, 2, 3, 4, 5, 6]),
        ("", [0, 1, 2, 3, 4, 5, 6]),
        ("  ", [0, 1, 2, 3, 4, 5, 6]),
        ("3", [3]),
        ("0,6", [0, 6]),
        ("2-4", [2, 3, 4]),
        ("5-5", [5]),
        ("stem", [1]),
        ("block.conv1", [3]),
        ("block", [4]),  # module path of a functional call
        ("relu", [2, 4]),
        ("ReLU", [2, 4]),
        ("conv", [1, 3]),  # prefix of the op type
        ("batch_norm", [5]),
        ("fc, 1-2 ,relu", [1, 2, 4, 6]),
        ("6,6,6", [6]),
    ],
)
def test_select_sites_entries(selection, expected):
    assert select_sites(SITES, selection) == expected


@pytest.mark.parametrize("entry", ["classifier.9", "7", "4-2", "conv3d", "9-12"])
def test_select_sites_unknown_entry_raises(entry):
    with pytest.raises(SiteError) as raised:
        select_sites(SITES, f"1,{entry}")

    message = str(raised.value)
    assert repr(entry) in message
    assert "0-6" in message
    assert "wnplan sites" in message


def test_select_sites_error_lists_names_and_ops():
    with pytest.raises(SiteError) as raised:
        select_sites(SITES, "missing")

    message = str(raised.value)
    assert "stem" in message
    assert "batch_norm" in message


def test_select_sites_non_ascii_digit_raises_site_error():
    with pytest.raises(SiteError):
        select_sites(SITES, "²")


@pytest.mark.parametrize("backend", ["pt2", "onnx"])
def test_select_sites_on_exported_model(backend, residual_model):
    model = load_model(residual_model.path(backend))
    ops = [site.op.lower() for site in model.sites]

    conv = select_sites(model.sites, "conv")
    by_name = select_sites(model.sites, model.sites[3].name)
    mixed = select_sites(model.sites, f"0,{model.sites[-1].name},2-3")

    assert conv == [index for index, op in enumerate(ops) if op.startswith("conv")]
    assert len(conv) == 4
    assert by_name == [3]
    assert mixed == [0, 2, 3, len(model.sites) - 1]


def test_select_sites_op_type_named_like_node(residual_model):
    model = load_model(residual_model.pt2)
    relu_sites = [site.index for site in model.sites if site.op == "relu"]
    assert len(relu_sites) == 3

    assert select_sites(model.sites, "relu") == relu_sites


def test_select_sites_module_name_matches_every_call(tmp_path):
    torch.manual_seed(0)
    path = export_pt2(SharedLinearNet(), torch.randn(2, 4), tmp_path / "shared.pt2")
    model = load_model(path)

    chosen = select_sites(model.sites, "shared")

    assert len(chosen) == 2
    assert {model.sites[index].module for index in chosen} == {"shared"}
