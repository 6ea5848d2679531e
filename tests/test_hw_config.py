"""hw.json: loading, validation (one-line ConfigErrors), hashing, and the generated .svh."""

from __future__ import annotations

import json

import pytest

from m3vit.errors import ConfigError
from m3vit.rtl_sim import emit
from m3vit.rtl_sim.hwconfig import DEFAULT_PATH, HwConfig, Limits, load_hw_config


def test_shipped_hw_json_is_the_documented_default():
    hw = load_hw_config(DEFAULT_PATH)
    assert hw == HwConfig()
    assert (hw.board, hw.part, hw.clock_mhz) == ("zcu104", "xczu7ev-ffvc1156-2-e", 300)
    assert (hw.p_in, hw.p_out, hw.act_bits, hw.weight_bits, hw.acc_bits, hw.score_bits) == (32, 48, 16, 16, 48, 16)
    assert hw.axi_width_bits == 128
    assert hw.dsp_estimate == 32 * 48 + 48 and hw.dsp_datapath <= 1728


def test_hash_is_stable_and_sensitive():
    a, b = HwConfig(), HwConfig.default()
    assert a.hash() == b.hash() and len(a.hash()) == 64
    assert a.to_json() == json.dumps(a.to_dict(), sort_keys=True, separators=(",", ":"))
    assert a.replace(p_out=47).hash() != a.hash()
    assert a.replace(limits=Limits(max_tokens=1024)).hash() != a.hash()


def test_round_trip_and_missing_keys_take_defaults(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"p_in": 16, "p_out": 16, "buffers": {"scores": 4096}}))
    hw = load_hw_config(path)
    assert (hw.p_in, hw.p_out, hw.buffers.scores, hw.buffers.weights) == (16, 16, 4096, HwConfig().buffers.weights)
    assert HwConfig.from_dict(json.loads(hw.to_json())) == hw


@pytest.mark.parametrize("data, message", [
    ({"p_inn": 4}, "unknown key 'p_inn'"),
    ({"p_in": "32"}, "p_in must be an integer"),
    ({"p_in": True}, "p_in must be an integer"),
    ({"p_in": 0}, "p_in must be between 1 and 256"),
    ({"p_in": 64, "p_out": 64}, "needs 4277 DSP48E2 (compute_unit 4160, attention 67, layernorm_unit 46, topk_gate 4)"),
    ({"acc_bits": 32}, "acc_bits must be 48"),
    ({"score_bits": 8}, "score_bits must be 16"),
    ({"act_bits": 40}, "act_bits must be between 2 and 26"),
    ({"token_block": 12}, "token_block must be a power of two"),
    ({"board": "zcu102"}, "board must be one of zcu104"),
    ({"part": "xczu9eg"}, "part for board zcu104"),
    ({"axi_width_bits": 256}, "axi_width_bits must be 32, 64 or 128"),
    ({"buffers": {"weights": 8_000_000}}, "buffers.weights must be between"),
    ({"buffers": {"weights": 3_000_000, "activations": 2_000_000}}, "more than the"),
    ({"buffers": []}, "buffers must be an object"),
    ({"limits": {"max_k": 8, "max_experts": 4}}, "max_k (8) exceeds"),
    ({"limits": {"max_heads": 0}}, "limits.max_heads must be between"),
    ({"limits": {"heads": 2}}, "unknown key 'heads'"),
    ([1, 2], "expected a JSON object"),
])
def test_invalid_configs_give_one_line_errors(data, message):
    with pytest.raises(ConfigError) as err:
        HwConfig.from_dict(data, "hw.json")
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith("hw.json")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such hardware config file"):
        load_hw_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"p_in\": 4,}")
    with pytest.raises(ConfigError, match=r"not valid JSON: .* at line 1"):
        load_hw_config(bad)


def test_with_parallel():
    assert HwConfig().with_parallel("8x4").macs == 32
    assert HwConfig().with_parallel("16×8").p_out == 8
    for spec in ("8", "8x", "axb", "8x4x2"):
        with pytest.raises(ConfigError, match="PINxPOUT"):
            HwConfig().with_parallel(spec)


def test_rtl_params_of_the_default():
    assert HwConfig().rtl_params() == {"P_IN": 32, "P_OUT": 48, "SM_P": 32, "ACT_W": 16, "W_W": 16, "ACC_W": 48, "SCORE_W": 16,
                                       "SHIFT_W": 7, "CSH_W": 6, "OB_W": 5, "SLOTS": 32, "TAG_W": 11}


def test_svh_is_byte_identical_and_rewritten_only_on_change(tmp_path):
    hw = HwConfig()
    text = emit.render_svh(hw)
    assert text == emit.render_svh(HwConfig.default())
    assert "`define M3V_P_IN 32\n" in text and hw.hash() in text
    path = emit.emit_svh(hw, tmp_path)
    first = path.stat().st_mtime_ns
    assert emit.emit_svh(hw, tmp_path).read_bytes() == text.encode()
    assert path.stat().st_mtime_ns == first
    emit.emit_svh(hw.replace(p_in=16), tmp_path)
    assert "`define M3V_P_IN 16\n" in path.read_text()
