import json
from pathlib import Path

import pytest

from dinodist.core.errors import DinodistError
from dinodist.core.models.arch import (
    ARCHS,
    PAPER_DINO_HEAD,
    PAPER_IBOT_HEAD,
    PRESETS,
    forward_flops,
    get_arch,
    head_parameters,
    num_parameters,
)

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "state_dicts"


def _summary():
    path = REF / "_summary.json"
    if not path.exists():
        pytest.skip("../shared/reference not present")
    return json.loads(path.read_text())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_analytic_counts_match_reference(arch):
    ref = _summary()[arch]
    spec = get_arch(arch)
    assert num_parameters(spec) == ref["_total_parameters"]
    assert spec.ffn_hidden == ref["_ffn_hidden"]
    assert forward_flops(spec, 224) == ref["_forward_flops_224"]
    assert forward_flops(spec, 256) == ref["_forward_flops_256"]


def test_paper_head_parameters():
    assert head_parameters(PAPER_DINO_HEAD, 4096) == 239_092_224
    assert head_parameters(PAPER_DINO_HEAD, 4096, with_last_layer=False) == 104_874_496
    assert head_parameters(PAPER_IBOT_HEAD, 4096) == 72_884_608


def test_presets_keep_family_order():
    sizes = [num_parameters(get_arch(p)) for p in PRESETS]
    assert sizes == sorted(sizes)
    for name, (base, _) in PRESETS.items():
        assert get_arch(name).ffn_layer == ARCHS[base].ffn_layer


def test_unknown_arch_and_override_errors():
    with pytest.raises(DinodistError, match="unknown arch 'vitx'; known: vits16"):
        get_arch("vitx")
    with pytest.raises(DinodistError, match="unknown override 'depthh'"):
        get_arch("vits16", depthh=3)
    with pytest.raises(DinodistError, match="not divisible"):
        get_arch("vits16", num_heads=5)
