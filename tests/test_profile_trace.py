"""benchmarks/profile_trace.py: reading a jax.profiler trace back and putting every XLA op of a
train step into a category by the op name JAX recorded (module path and named scopes)."""

import json
import sys
from types import SimpleNamespace

from conftest import ROOT, run_python

sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_trace  # noqa: E402


def test_scopes_take_off_jax_transformations():
    name = "jit(train_step)/transpose(jvp(GPT))/decoder/layers_0/self_attention/sdpa/dot_general"
    assert profile_trace.scopes(name)[1:] == [
        "GPT",
        "decoder",
        "layers_0",
        "self_attention",
        "sdpa",
        "dot_general",
    ]


def test_op_names_fall_into_the_right_categories():
    cases = {
        "jit(train_step)/jvp(GPT)/decoder/layers_0/self_attention/sdpa/exp": "attention",
        "jit(train_step)/transpose(jvp(GPT))/decoder/layers_1/mlp/wi/dot_general": (
            "matmuls (projections, MLP)"
        ),
        "jit(train_step)/jvp(GPT)/decoder/layers_0/self_attention/qkv/dot_general": (
            "matmuls (projections, MLP)"
        ),
        "jit(train_step)/jvp(GPT)/decoder/layers_0/mlp/wi/add": "other",  # the bias
        "jit(train_step)/jvp(GPT)/decoder/layers_0/norm_mlp/rsqrt": "norms",
        "jit(train_step)/jvp(GPT)/decoder/final_norm/mul": "norms",
        "jit(train_step)/jvp(GPT)/embed/dropout/random_bits": "dropout random numbers",
        "jit(train_step)/jvp(GPT)/embed/add": "embedding",
        "jit(train_step)/transpose(jvp(logits))/GPT.logits/embed.attend/dot_general": (
            "loss and logits"
        ),
        "jit(train_step)/jvp(loss)/reduce_max": "loss and logits",
        "jit(train_step)/optimizer/sqrt": "optimizer and casts",
        "jit(train_step)/jvp(GPT)/decoder/layers_0/convert_element_type": "optimizer and casts",
        "jit(train_step)/jvp(GPT)/decoder/layers_0/self_attention/transpose": (
            "copies and transposes"
        ),
    }
    for op_name, category in cases.items():
        assert profile_trace.our_category(op_name) == category, op_name
    assert set(cases.values()) <= set(profile_trace.CATEGORIES)


def test_busy_time_is_the_union_of_intervals():
    events = [("a", 0, 10), ("b", 5, 10), ("c", 30, 5), ("d", 31, 1)]  # 0-15 and 30-35
    assert profile_trace.busy_ns(events) == 20


def test_instruction_op_names_read_the_metadata():
    hlo = (
        '  %fusion.3 = f32[2]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_type="add" '
        'op_name="jit(f)/mlp/add" source_file="x.py"}\n'
        '  ROOT %dot.1 = f32[2]{0} dot(%a, %b), metadata={op_name="jit(f)/mlp/wi/dot_general"}\n'
        "  %copy.2 = f32[2]{0} copy(%a)\n"
    )
    assert profile_trace.instruction_op_names(hlo) == {
        "fusion.3": "jit(f)/mlp/add",
        "dot.1": "jit(f)/mlp/wi/dot_general",
    }


def test_torch_ops_by_name_caller_and_vocabulary_shape():
    def event(name, parent=None, shapes=()):
        return SimpleNamespace(name=name, cpu_parent=parent, input_shapes=list(shapes))

    step = event("Optimizer.step#AdamW.step")
    loss = event("aten::cross_entropy_loss")
    assert profile_trace.torch_category(event("aten::add", loss), 512) == "loss and logits"
    assert profile_trace.torch_category(event("aten::mul_", step), 512) == "optimizer and casts"
    head = event("aten::mm", shapes=[[128, 64], [64, 512]])
    assert profile_trace.torch_category(head, 512) == "loss and logits"
    mlp = event("aten::addmm", shapes=[[256], [128, 64], [64, 256]])
    assert profile_trace.torch_category(mlp, 512) == "matmuls (projections, MLP)"
    sdpa = event("aten::_scaled_dot_product_flash_attention")
    assert profile_trace.torch_category(sdpa, 512) == "attention"
    assert profile_trace.torch_category(event("aten::native_layer_norm"), 512) == "norms"
    assert profile_trace.torch_category(event("aten::bernoulli_"), 512) == (
        "dropout random numbers"
    )
    assert profile_trace.torch_category(event("aten::tanh"), 512) == "other"


def test_a_traced_cpu_step_names_its_ops_and_fills_the_categories(tmp_path):
    out = tmp_path / "profile.json"
    args = ["--layers", "2", "--heads", "2", "--width", "64", "--context", "64", "--batch", "2"]
    args += ["--vocab", "512", "--steps", "2", "--warmup", "1", "--set", "model.dropout_rate=0.1"]
    proc = run_python(
        "benchmarks/profile_trace.py", *args, "--no-reference", "--json", out, check=True
    )
    assert "device time per step by category" in proc.stdout
    ours = json.loads(out.read_text())["ours"]
    # Nearly all the time is in ops with an op name (measured 94%: the loop-carried copies of
    # the random-number loops have none).
    assert ours["named_time"] > 0.9
    for category in (
        "attention",
        "matmuls (projections, MLP)",
        "norms",
        "dropout random numbers",
        "loss and logits",
        "optimizer and casts",
    ):
        assert ours["categories"][category] > 0, category
    assert 0 < ours["busy_ms_per_step"] <= ours["wall_ms_per_step"]
    assert len(ours["top_ops"]) == 25
