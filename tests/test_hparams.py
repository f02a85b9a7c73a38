"""The official layer/width string grammar and the grouping of blocks into scanned runs."""

import pytest

from vdvae_sr_jax.hparams import decoder_runs, encoder_runs, parse_layer_string, parse_width_string


def test_layer_string_grammar():
    assert parse_layer_string("32x2,32d2,16,8m4") == [(32, None), (32, None), (32, 2), (16, None), (8, 4)]


def test_imagenet64_decoder_has_75_blocks():
    blocks = parse_layer_string("1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12")
    assert len(blocks) == 75
    runs = decoder_runs(blocks)
    assert [(r.res, r.length, r.extra) for r in runs] == [
        (1, 2, None), (4, 4, 1), (8, 8, 4), (16, 16, 8), (32, 32, 16), (64, 13, 32)
    ]
    assert [r.name for r in runs][:2] == ["dec_blocks_0_1", "dec_blocks_2_5"]


def test_encoder_runs_keep_down_blocks_alone():
    runs = encoder_runs(parse_layer_string("32x3,32d2,16x1,16d4,4"))
    assert [(r.name, r.stacked) for r in runs] == [
        ("enc_blocks_0_2", True), ("enc_blocks_3", False), ("enc_blocks_4_4", True),
        ("enc_blocks_5", False), ("enc_blocks_6_6", True),
    ]


def test_width_string_defaults_to_width():
    widths = parse_width_string(16, "16:24,8:32")
    assert (widths[16], widths[8], widths[32]) == (24, 32, 16)


@pytest.mark.parametrize("bad", ["32y2", "ax2", "8m", ""])
def test_bad_layer_token_is_named(bad):
    with pytest.raises(ValueError, match="bad token"):
        parse_layer_string(bad)


def test_bad_width_token_is_named():
    with pytest.raises(ValueError, match="'16-24'"):
        parse_width_string(16, "16-24")
