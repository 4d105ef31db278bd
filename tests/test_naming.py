"""Naming schemes: which tensor names are routed-expert parts, of which expert, role and field."""

from __future__ import annotations

import random

import pytest

from nvfp4_fuse.naming import UnknownExpertPart, fused_name, parse_expert_name


@pytest.mark.parametrize(
    "template,prefix,roles",
    [
        ("model.layers.{l}.mlp.experts.{e}.{p}.{f}", "model.layers.{l}.mlp.experts", ("gate_proj", "up_proj", "down_proj")),
        ("model.layers.{l}.block_sparse_moe.experts.{e}.{p}.{f}", "model.layers.{l}.block_sparse_moe.experts", ("w1", "w3", "w2")),
        ("layers.{l}.ffn.experts.{e}.{p}.{f}", "layers.{l}.ffn.experts", ("w1", "w3", "w2")),
        ("mtp.{l}.ffn.experts.{e}.{p}.{f}", "mtp.{l}.ffn.experts", ("w1", "w3", "w2")),
    ],
    ids=["hf", "mixtral", "deepseek", "deepseek-mtp"],
)
def test_schemes(template, prefix, roles):
    l, e = random.randint(0, 99), random.randint(0, 511)
    for proj, role in zip(roles, ("gate", "up", "down")):
        for field, canon, recip in (
            ("weight", "weight", False),
            ("weight_scale", "weight_scale", False),
            ("weight_scale_2", "weight_scale_2", False),
            ("input_scale", "input_scale", False),
            ("weight_packed", "weight", False),
            ("weight_global_scale", "weight_scale_2", True),
            ("input_global_scale", "input_scale", True),
        ):
            p = parse_expert_name(template.format(l=l, e=e, p=proj, f=field))
            assert p is not None
            assert (p.prefix, p.expert, p.proj, p.role, p.field, p.reciprocal, p.source_field) == (
                prefix.format(l=l),
                e,
                proj,
                role,
                canon,
                recip,
                field,
            )


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.3.mlp.shared_experts.gate_proj.weight",
        "layers.3.ffn.shared_experts.w1.weight",
        "model.layers.3.mlp.gate.weight",
        "layers.0.ffn.gate.tid2eid",
        "model.embed_tokens.weight",
        "layers.3.ffn.experts.w13_weight",  # already fused
        "model.layers.3.mlp.experts.gate_up_proj",
    ],
)
def test_other_tensors_are_not_experts(name):
    assert parse_expert_name(name) is None


@pytest.mark.parametrize(
    "name,needle",
    [
        ("model.layers.1.mlp.experts.0.gate_up_proj.weight", "unknown expert projection"),
        ("layers.1.ffn.experts.3.w1.pre_quant_scale", "unknown NVFP4 expert field"),
        ("layers.1.ffn.experts.07.w1.weight", "leading zero"),
    ],
)
def test_unknown_parts_are_refused(name, needle):
    with pytest.raises(UnknownExpertPart, match=needle):
        parse_expert_name(name)


def test_fused_name():
    assert fused_name("layers.0.ffn.experts", "w13_input_scale") == "layers.0.ffn.experts.w13_input_scale"
