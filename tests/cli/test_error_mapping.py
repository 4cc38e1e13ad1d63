"""Only our own error types map to exit codes; anything else is a bug and keeps its traceback. Library
messages name the argument, and the CLI adds the flag."""

from __future__ import annotations

import pytest

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import EXIT_CODES, error_exit_code, with_flags
from sae_lens_vision_steer.core import errors


def test_each_user_error_has_its_documented_exit_code():
    want = {errors.UsageError: 2, errors.UnknownNameError: 2, errors.UnsupportedError: 2, errors.InputError: 3,
            errors.MissingInputError: 3, errors.ConflictError: 4, errors.OutputError: 5, errors.DeviceError: 6}
    for cls, code in want.items():
        assert error_exit_code(cls("x")) == code and code in EXIT_CODES, cls
    for builtin in (ValueError("x"), KeyError("x"), TypeError("x"), RuntimeError("x"), IndexError(0)):
        assert error_exit_code(builtin) is None  # a bug: the traceback is shown
    assert str(errors.UnknownNameError("unknown method 'x'")) == "unknown method 'x'"  # not KeyError's quotes
    assert isinstance(errors.UsageError("x"), ValueError) and isinstance(errors.UnknownNameError("x"), KeyError)


def test_a_bug_inside_a_command_is_not_dressed_as_a_usage_error(tmp_path, monkeypatch):
    import sae_lens_vision_steer.cli.train as train_cli

    def broken(args):
        return {}["a key that a bug looked up"]

    monkeypatch.setattr(train_cli, "run", broken)
    with pytest.raises(KeyError, match="a key that a bug looked up"):
        main(["train", "--cache", str(tmp_path), "--out", str(tmp_path / "sae")])


def test_library_messages_name_arguments_and_the_cli_adds_flags(tmp_path, capsys):
    from sae_lens_vision_steer.training.trainer import TrainConfig

    with pytest.raises(errors.UsageError) as err:
        TrainConfig(lr_warm_up_steps=-1)
    assert "--" not in str(err.value) and err.value.arguments == ("lr_warm_up_steps",)
    assert with_flags(str(err.value), err.value.arguments).startswith("lr_warm_up_steps (--warmup-steps) must be")
    assert with_flags("batch_size must be a positive whole number", ("batch_size",),
                      {"batch_size": "--train-batch-size"}) == "batch_size (--train-batch-size) must be a positive whole number"
