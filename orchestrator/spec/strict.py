"""What every part of the sweep spec is built on: strict pydantic models, and plain names.

Fields are strict: a number is not a string or a boolean, a boolean is not the string "false",
no float is NaN or infinite, and no field is unknown.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from orchestrator.spec import checks


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def plain_name(value: str) -> str:
    if not value.strip():
        raise ValueError("a name can't be empty or only whitespace")
    if checks.has_control_characters(value):
        raise ValueError(f"name {value!r} has control characters; use printable characters")
    return value


Name = Annotated[str, AfterValidator(plain_name)]
