"""The one line shown for a failed candidate, from the traceback its record keeps."""

from orchestrator.error_text import summarize


def _traceback(cls: str, message: str) -> str:
    return f'Traceback (most recent call last):\n  File "m.py", line 3, in forward\n    x = f()\n{cls}: {message}\n'


def test_a_plain_message_shows_its_first_line():
    assert summarize("RuntimeError: linker failed\n  at line 3") == "RuntimeError: linker failed"
    assert summarize("") is None and summarize(None) is None and summarize("\n  \n") is None


def test_a_traceback_shows_its_exception_not_the_boilerplate_after_it():
    # torch.export's errors end with advice lines; the exception's own header is what matters.
    text = _traceback("torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode",
                      "Could not guard on data-dependent expression Eq(u0, 1)") + (
        "\nFor more information, run with TORCH_LOGS=\"dynamic\"\n\n"
        "The error above occurred when calling torch.export.export.\n"
        "(Refer to the full stack trace above for more information.)\n")
    assert summarize(text) == "GuardOnDataDependentSymNode: Could not guard on data-dependent expression Eq(u0, 1)"


def test_a_chained_error_names_the_wrapper_and_its_cause():
    text = (_traceback("KeyError", "'weight'") + "\nThe above exception was the direct cause of the following exception:\n\n"
            + _traceback("torch.onnx._internal.exporter._errors.TorchExportError",
                         "\x1b[96mFailed to export\x1b[0m the model with torch.export. This is step 1/3"))
    assert summarize(text) == "TorchExportError from KeyError: 'weight'"


def test_a_re_raise_with_the_same_message_keeps_the_original_class():
    text = (_traceback("ValueError", "bad shape") + "\nThe above exception was the direct cause of the following exception:\n\n"
            + _traceback("RuntimeError", "bad shape"))
    assert summarize(text) == "ValueError: bad shape"


def test_a_long_line_is_clipped_to_the_limit():
    line = summarize(_traceback("RuntimeError", "x" * 500), limit=50)
    assert len(line) == 50 and line.startswith("RuntimeError: xxx") and line.endswith("...")
