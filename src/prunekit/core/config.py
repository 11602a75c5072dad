"""Configuration pieces shared by recipes of every dimension, and YAML round-tripping."""

from __future__ import annotations

from pathlib import Path
import sys
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prunekit.core.text import TextProtocol
from prunekit.errors import PrunekitError

RecipeT = TypeVar("RecipeT", bound="RecipeModel")


def explain_validation_error(exc: ValidationError, where: str) -> PrunekitError:
    problem = exc.errors()[0]
    location = ".".join(str(p) for p in problem["loc"])
    message = problem["msg"].removeprefix("Value error, ")
    return PrunekitError(f"{where}: {location}: {message}" if location else f"{where}: {message}")


def warn_renamed(old: str, new: str) -> None:
    """A setting renamed in this release: still read, with a warning, until the next one."""
    print(f"warning: '{old}' is deprecated and goes in the next release; use '{new}'", file=sys.stderr)


def blocks_field() -> Any:
    """The recipe key behind ``--blocks``: the model's list of blocks, named where its structure does not tell."""
    return Field(None, description="the model's list of blocks, where structure cannot tell (e.g. model.layers)")


class RecipeModel(BaseModel):
    """A pydantic model that reads and writes YAML; unknown keys are errors, not silently ignored.

    ``renamed`` maps settings renamed in this release to their new names: recipes written before
    still load (with a warning) for one more release.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _read_renamed(cls, data: Any) -> Any:
        if not cls.renamed or not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in cls.renamed.items():
            if old in data:
                if new in data:
                    raise ValueError(f"give '{new}' or its old name '{old}', not both")
                warn_renamed(old, new)
                data[new] = data.pop(old)
        return data

    @classmethod
    def build(cls: type[RecipeT], data: dict[str, Any], where: str = "recipe") -> RecipeT:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise explain_validation_error(exc, where) from None

    @classmethod
    def from_yaml(cls: type[RecipeT], path: str | Path) -> RecipeT:
        path = Path(path).expanduser()
        if not path.is_file():
            raise PrunekitError(f"no such recipe file: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise PrunekitError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise PrunekitError(f"recipe {path} must be a mapping of settings")
        return cls.build(data, where=f"recipe {path}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


class TextDataConfig(RecipeModel):
    """The calibration and test text, as in ``prunekit.core.text.TextProtocol``."""

    calibration: str = "wiki"
    test: str = "wiki"
    calibration_samples: int = Field(32, ge=1)
    test_windows: int = Field(40, ge=1)
    seq_len: int = Field(512, ge=2)
    seed: int = 0
    split: float = Field(0.8, gt=0, lt=1)
    text_field: str = "text"

    def protocol(self) -> TextProtocol:
        return TextProtocol(**self.model_dump())
