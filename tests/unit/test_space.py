"""ElasticSpace / QuantChoice / SubnetConfig: defaults, validation errors that name the fix, versioned JSON."""
from __future__ import annotations

import json
import os

import pytest

from eqnet_plugin.quant.grid import Grid, Scheme
from eqnet_plugin.quant.space import (CONFIG_VERSION, ElasticSpace, QuantChoice, SubnetConfig, atomic_write_text)


def test_defaults_are_the_papers_space():
    sp = ElasticSpace()
    assert sp.weight_bits == sp.act_bits == (2, 3, 4, 5, 6, 7, 8)
    assert sp.weight_symmetric == sp.act_symmetric == (True, False)
    assert sp.weight_per_channel == (True, False)
    assert sp.fixed_bits == 8


def test_space_normalizes_and_adds_fixed_bits_to_cells():
    sp = ElasticSpace(weight_bits=[8, 4, 4], act_bits=(3,), weight_symmetric=(False, True), fixed_bits=6)
    assert sp.weight_bits == (4, 8) and sp.weight_symmetric == (True, False)
    assert sp.cell_bits(is_weight=True) == (4, 6, 8)
    assert sp.cell_bits(is_weight=False) == (3, 6)
    assert ElasticSpace(act_bits=(3,), fixed_bits=None).cell_bits(False) == (3,)
    assert ElasticSpace.from_dict(sp.to_dict()) == sp
    assert hash(sp) == hash(ElasticSpace.from_dict(json.loads(json.dumps(sp.to_dict()))))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"weight_bits": (1, 4)}, "weight_bits holds 1; bit-widths must be integers in [2, 8]"),
    ({"act_bits": (4, 9)}, "act_bits holds 9"),
    ({"act_bits": (4.0,)}, "act_bits holds 4.0"),
    ({"weight_bits": (True,)}, "weight_bits holds True"),
    ({"weight_bits": ()}, "weight_bits is empty; give at least one bit-width, e.g. weight_bits=(4, 8)"),
    ({"fixed_bits": 16}, "fixed_bits holds 16"),
    ({"act_symmetric": ("yes",)}, "act_symmetric must be a non-empty tuple of bools, e.g. (True, False)"),
    ({"weight_per_channel": ()}, "weight_per_channel must be a non-empty tuple of bools"),
])
def test_space_rejects_bad_values_naming_the_fix(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        ElasticSpace(**kwargs)
    assert fragment in str(e.value)


def test_space_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown ElasticSpace keys \['w_bits'\]; valid keys are"):
        ElasticSpace.from_dict({"w_bits": [4]})


@pytest.mark.parametrize("args, fragment", [
    ((1,), "bits=1 is invalid; use an integer in [2, 8]"),
    ((9, True), "bits=9 is invalid"),
    (("8",), "bits='8' is invalid"),
    ((8, "true"), "symmetric='true' must be a bool"),
    ((8, True, 1), "per_channel=1 must be a bool"),
])
def test_quant_choice_validation(args, fragment):
    with pytest.raises(ValueError) as e:
        QuantChoice(*args)
    assert fragment in str(e.value)


def _cfg() -> SubnetConfig:
    return SubnetConfig({"conv1.weight_fake_quant": QuantChoice(8, True, True),
                         "activation_post_process_1": QuantChoice(4, False, False),
                         "fc.weight_fake_quant": QuantChoice(2, False, True)})


def test_subnet_config_json_round_trip(tmp_path):
    cfg = _cfg()
    d = cfg.to_dict()
    assert d["version"] == CONFIG_VERSION == 1
    assert list(d["groups"]) == sorted(d["groups"])           # stable, sorted keys
    assert SubnetConfig.from_dict(d) == cfg
    assert SubnetConfig.from_json(cfg.to_json()) == cfg       # from a JSON string
    path = tmp_path / "sub" / "cfg.json"
    text = cfg.to_json(path)
    assert path.read_text() == text
    assert SubnetConfig.from_json(path) == cfg and SubnetConfig.from_json(str(path)) == cfg
    assert hash(SubnetConfig.from_json(path)) == hash(cfg)
    assert [p.name for p in path.parent.iterdir()] == ["cfg.json"]   # no temp file left behind


def test_subnet_config_mapping_api_and_replace():
    cfg = _cfg()
    assert len(cfg) == 3 and set(cfg) == set(cfg.groups)
    assert cfg["fc.weight_fake_quant"] == QuantChoice(2, False, True)
    new = cfg.replace(**{"fc.weight_fake_quant": QuantChoice(8)})
    assert new["fc.weight_fake_quant"] == QuantChoice(8) and cfg["fc.weight_fake_quant"].bits == 2
    assert cfg.scheme() == ({True, False}, {True, False})
    assert cfg.scheme(["conv1.weight_fake_quant"]) == ({True}, {True})
    assert QuantChoice.from_dict({"bits": 4}) == QuantChoice(4, True, False)   # documented defaults


def test_subnet_config_of_another_version_names_the_fix(tmp_path):
    path = tmp_path / "old.json"
    d = _cfg().to_dict()
    d["version"] = 2
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"SubnetConfig version 2 is not supported; this eqnet_plugin reads "
                                         r"version 1 \(write the file with SubnetConfig.to_json"):
        SubnetConfig.from_json(path)
    del d["version"]
    with pytest.raises(ValueError, match="version None is not supported"):
        SubnetConfig.from_dict(d)


@pytest.mark.parametrize("payload, fragment", [
    ([1, 2], "a SubnetConfig must be a JSON object, got list"),
    ({"version": 1, "groups": {"a": {"bits": 3}}, "extra": 1}, "unknown SubnetConfig keys ['extra']"),
    ({"version": 1, "groups": [1]}, "'groups' must be an object mapping group name"),
    ({"version": 1, "groups": {"a": {"bits": 12}}}, "groups['a']: bits=12 is invalid; use an integer in [2, 8]"),
    ({"version": 1, "groups": {"a": {"symmetric": True}}}, "groups['a']: missing 'bits'"),
    ({"version": 1, "groups": {"a": {"bits": 4, "sym": True}}}, "groups['a']: unknown keys ['sym']; valid keys are"),
    ({"version": 1, "groups": {"a": 4}}, "groups['a']: expected an object like"),
    ({"version": 1, "groups": {"a": {"bits": 4, "per_channel": "no"}}}, "per_channel='no' must be a bool"),
])
def test_subnet_config_validation_on_load(payload, fragment):
    with pytest.raises(ValueError) as e:
        SubnetConfig.from_dict(payload)
    assert fragment in str(e.value)


def test_subnet_config_rejects_bad_construction_and_files(tmp_path):
    with pytest.raises(ValueError, match="expected a QuantChoice"):
        SubnetConfig({"a": 4})
    with pytest.raises(ValueError, match="group names must be strings"):
        SubnetConfig({1: QuantChoice(4)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SubnetConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON .*written by SubnetConfig.to_json"):
        SubnetConfig.from_json(bad)


def test_grid_is_the_choice_type_and_binds_its_integer_range():
    assert QuantChoice is Grid
    g = Grid(4, symmetric=False, per_channel=True)
    assert g.to_dict() == {"bits": 4, "symmetric": False, "per_channel": True}      # a subnet's JSON, unchanged
    with pytest.raises(ValueError, match=r"signed is not bound; use grid.bind\(signed=...\)"):
        g.int_range
    assert g.bind(True).int_range == (-8, 7) and g.bind(False).int_range == (0, 15)
    assert (g.bind(True).qmin, g.bind(True).qmax) == (-8, 7)
    assert Grid.from_dict(g.bind(False).to_dict()) == g.bind(False)
    with pytest.raises(ValueError, match="signed='yes' must be True, False or None"):
        Grid(4, signed="yes")
    with pytest.raises(ValueError, match="a bound grid; a SubnetConfig holds choices with signed=None"):
        SubnetConfig({"a": Grid(4, signed=True)})
    with pytest.raises(ValueError, match="group 'a' maps to .*a bound grid"):
        SubnetConfig.from_dict({"version": 1, "groups": {"a": {"bits": 4, "signed": True}}})


def test_scheme_parses_the_cli_names_once():
    assert Scheme.names() == ("sym", "sym-pc", "asym", "asym-pc", "wsym-aasym", "wsym-pc-aasym")
    flags = {s.value: (s.weight_symmetric, s.per_channel, s.act_symmetric) for s in Scheme}
    assert flags == {"sym": (True, False, True), "sym-pc": (True, True, True), "asym": (False, False, False),
                     "asym-pc": (False, True, False), "wsym-aasym": (True, False, False),
                     "wsym-pc-aasym": (True, True, False)}
    assert Scheme.parse(" SYM-PC ") is Scheme.SYM_PC and Scheme.parse(Scheme.ASYM) is Scheme.ASYM
    assert Scheme.SYM_PC.weight_grid(4) == Grid(4, True, True) and Scheme.SYM_PC.act_grid(8) == Grid(8, True, False)
    with pytest.raises(ValueError, match="unknown scheme 'pc'; choose one of sym, sym-pc, asym"):
        Scheme.parse("pc")


def test_qparams_carry_a_bound_grid_that_matches_the_axis():
    import torch

    from eqnet_plugin.export.ir import QParams

    s, z = torch.ones(3), torch.zeros(3, dtype=torch.int32)
    qp = QParams(s, z, Grid(4, True, True, signed=True), 0)
    assert (qp.qmin, qp.qmax, qp.bits, qp.symmetric, qp.signed, qp.per_channel) == (-8, 7, 4, True, True, True)
    assert qp.to_dict()["qmin"] == -8 and qp.to_dict()["signed"] is True
    with pytest.raises(ValueError, match="needs a bound Grid"):
        QParams(s, z, Grid(4, True, True), 0)
    with pytest.raises(ValueError, match="grid.per_channel=True but axis=None"):
        QParams(s, z, Grid(4, True, True, signed=True), None)


def test_atomic_write_leaves_old_file_on_error(tmp_path, monkeypatch):
    path = tmp_path / "cfg.json"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.json"]
