"""Argument checks: typed errors that name the argument, raised before anything is loaded."""

import subprocess
import sys
import warnings

import pytest
import torch

from llama import Llama
from llama.engine.validation import (
    ArgumentError,
    ArgumentTypeError,
    ArgumentValueError,
    LlamaWarning,
    check_arguments,
    check_device,
    check_dtype,
    check_temperature,
    check_top_p,
)
from tests.conftest import REPO


@pytest.mark.parametrize("value, error, message", [
    (float("nan"), ArgumentValueError, "temperature must be a finite number, got nan"),
    (float("inf"), ArgumentValueError, "temperature must be a finite number, got inf"),
    ("0.5", ArgumentTypeError, "temperature must be a number, got str '0.5'"),
    (True, ArgumentTypeError, "temperature must be a number, got True"),
    (None, ArgumentTypeError, "temperature must be a number, got None"),
    (-1, ArgumentValueError, r"temperature must be >= 0 \(0 is greedy\), got -1"),
])
def test_temperature_must_be_a_finite_number_at_least_zero(value, error, message):
    with pytest.raises(error, match=message) as caught:
        check_temperature(value)
    assert caught.value.param == "temperature"


def test_good_values_pass_and_come_back_normalised():
    assert check_temperature(0) == 0.0 and check_top_p(1) == 1.0
    assert check_dtype("bfloat16") is torch.bfloat16 and check_dtype(None) is None
    assert check_device("cuda:1") == torch.device("cuda", 1)
    check_arguments(dict(max_seq_len=8, max_gen_len=None, seed=-3, verify=False, other="x"))


@pytest.mark.parametrize("arguments, error, message", [
    (dict(top_p=2), ArgumentValueError, r"^top_p must be in \(0, 1\], got 2$"),
    (dict(top_p=float("nan")), ArgumentValueError, "^top_p must be a finite number"),
    (dict(top_p="0.9"), ArgumentTypeError, "^top_p must be a number, got str '0.9'"),
    (dict(max_seq_len=0), ArgumentValueError, "^max_seq_len must be a positive integer, got 0"),
    (dict(max_seq_len=8.0), ArgumentTypeError, "^max_seq_len must be an integer, got 8.0"),
    (dict(max_gen_len=-1), ArgumentValueError, "^max_gen_len must be a non-negative integer"),
    (dict(max_batch_size=True), ArgumentTypeError, "^max_batch_size must be an integer"),
    (dict(dtype="float64"), ArgumentValueError,
     "^dtype 'float64' is not supported; use one of float32, bfloat16, float16$"),
    (dict(dtype=torch.float64), ArgumentValueError, "^dtype 'float64' is not supported"),
    (dict(dtype=16), ArgumentTypeError, "^dtype must be a str"),
    (dict(device="gpu"), ArgumentValueError, "^device 'gpu' is not supported; use 'cpu'"),
    (dict(verify="yes"), ArgumentTypeError, "^verify must be True or False, got str 'yes'"),
    (dict(stop=[""]), ArgumentValueError, "^stop strings must not be empty"),
    (dict(stop=3), ArgumentTypeError, "^stop must be a list of strings"),
])
def test_each_argument_names_itself_in_its_error(arguments, error, message):
    with pytest.raises(error, match=message) as caught:
        check_arguments(arguments)
    assert caught.value.param == next(iter(arguments))
    assert isinstance(caught.value, (ValueError, TypeError))  # what callers caught before


def test_generation_refuses_non_finite_and_mistyped_sampling_arguments(build):
    generator = build("gqa")
    for kwargs, error in [(dict(temperature=float("nan")), ArgumentValueError),
                          (dict(temperature=float("inf")), ArgumentValueError),
                          (dict(temperature="0.5"), ArgumentTypeError),
                          (dict(top_p=float("nan")), ArgumentValueError),
                          (dict(max_gen_len=2.0), ArgumentTypeError)]:
        with pytest.raises(error, match=f"^{next(iter(kwargs))} must be"):
            generator.text_completion(["a"], **kwargs)
    with pytest.raises(ArgumentValueError, match="prompt 1 has 70 tokens") as caught:
        generator.generate([[1] * 70], 4)
    assert caught.value.param == "prompt_tokens"


def test_build_checks_arguments_before_any_file(tmp_path):
    missing = str(tmp_path / "missing")
    for kwargs, message in [(dict(max_seq_len=0), "^max_seq_len must be"),
                            (dict(dtype="float64"), "^dtype 'float64'"),
                            (dict(device="gpu"), "^device 'gpu'"),
                            (dict(seed="1"), "^seed must be an integer"),
                            (dict(model_parallel_size=0), "^model_parallel_size must be")]:
        arguments = {**dict(max_seq_len=8, max_batch_size=1), **kwargs}
        with pytest.raises(ArgumentError, match=message):
            Llama.build(missing, missing, **arguments)
    with pytest.raises(ArgumentTypeError, match="^tokenizer_path must be a path"):
        Llama.build(missing, 3, max_seq_len=8, max_batch_size=1)
    # None is the checkpoint directory's tokenizer.model, looked for once the directory is
    with pytest.raises(ArgumentError, match="^ckpt_dir .* does not exist"):
        Llama.build(missing, None, max_seq_len=8, max_batch_size=1)


def test_build_reports_the_checkpoint_directory_before_the_tokenizer(tmp_path, checkpoints):
    with pytest.raises(ArgumentError, match="^ckpt_dir .* does not exist") as caught:
        Llama.build(str(tmp_path / "no-ckpt"), str(tmp_path / "no.model"), 8, 1)
    assert caught.value.param == "ckpt_dir"
    with pytest.raises(ArgumentError, match="^tokenizer_path .* does not exist") as caught:
        Llama.build(checkpoints("gqa"), str(tmp_path / "no.model"), 8, 1)
    assert caught.value.param == "tokenizer_path"
    assert isinstance(caught.value, FileNotFoundError)
    assert "--" not in str(caught.value)  # Python terms for a Python caller


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_says_what_to_use_instead(checkpoints, tokenizer_path):
    with pytest.raises(ArgumentValueError, match="^device 'cuda' was asked for, but CUDA is not "
                                                 "available here .*: use 'cpu', or leave device "
                                                 "unset"):
        Llama.build(checkpoints("gqa"), tokenizer_path, 8, 1, device="cuda")


def test_max_seq_len_above_llama2s_context_warns(build):
    with pytest.warns(LlamaWarning, match="max_seq_len=5000 is above the 4096 tokens Llama 2 "
                                          "was trained on"):
        build("gqa", max_seq_len=5000, max_batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LlamaWarning)
        build("gqa", max_seq_len=4096, max_batch_size=1)


def test_verbose_false_prints_nothing(checkpoints, tokenizer_path):
    """In a fresh process: fairscale announces its groups only the first time."""
    code = ("from llama import Llama; import sys; "
            "g = Llama.build(sys.argv[1], sys.argv[2], 16, 1, verbose=False, device='cpu'); "
            "g.text_completion(['Hi'], max_gen_len=2)")
    result = subprocess.run([sys.executable, "-c", code, checkpoints("gqa"), tokenizer_path],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "" and "initializing" not in result.stderr, result.stderr
