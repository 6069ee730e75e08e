"""Request bodies of the API, with bounds. Pydantic names the failing field in each 422;
limits that depend on the model (max tokens, image size, ...) are checked in ``service.api``
against the registry entry."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

TaskName = Literal[
    "auto", "text-classification", "image-classification", "tabular-classification", "generation"
]


Text = Annotated[str, Field(min_length=1, max_length=20000)]
Row = Annotated[list[float], Field(min_length=1, max_length=4096)]
Ids = Annotated[list[int], Field(min_length=1, max_length=4096)]
Batch = 64  # rows per request, before the model's own max_batch


class Inputs(BaseModel):
    """Exactly one of: text (or a list of texts), a base64 PNG/JPEG image, a tabular row (or
    rows) of numbers, or raw token ids (a list, or a list of lists)."""

    model_config = ConfigDict(extra="forbid")
    text: Text | Annotated[list[Text], Field(min_length=1, max_length=Batch)] | None = None
    image: str | None = Field(default=None, description="base64 PNG or JPEG (data: URL ok)")
    features: Row | Annotated[list[Row], Field(min_length=1, max_length=Batch)] | None = None
    token_ids: Ids | Annotated[list[Ids], Field(min_length=1, max_length=Batch)] | None = None

    @model_validator(mode="after")
    def exactly_one(self) -> Inputs:
        given = [k for k in ("text", "image", "features", "token_ids") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of text, image, features, token_ids"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    def kind(self) -> str:
        return next(k for k in ("text", "image", "features", "token_ids") if getattr(self, k))


class RelevanceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["default", "contrast", "reference"] = Field(
        default="default",
        description="default: the non-negative |z| rule; contrast: signed contributions; "
        "reference: signed change from the input named by `reference` (default zeros), the "
        "most faithful mode in bench.faithfulness with the removal baseline (blur, mask), at "
        "about twice the cost",
    )
    multiplier: float = Field(default=100.0, gt=0, le=1e6)
    scaler: float = Field(default=1.0, gt=0, le=1e6)
    thresholding: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=1.0, gt=0, le=100)
    target: int | None = Field(default=None, ge=0, description="explain this class")
    reference: Literal["zeros", "mean", "blur", "mask"] | None = Field(
        default=None,
        description='mode "reference" only: what the input with its features removed is. '
        "zeros (the default): zero pixels, zero embeddings for tokens; mean: each image's "
        "mean colour; blur: the image blurred; mask: every token but the special ones "
        "replaced by the mask (or unknown) token. The mode is only as faithful as this "
        "choice (bench/README.md, Faithfulness)",
    )

    @field_validator("reference")
    @classmethod
    def _reference_needs_its_mode(cls, value: str | None, info: ValidationInfo) -> str | None:
        if "mode" not in info.data:  # mode itself is invalid: that error says enough
            return value
        mode = info.data["mode"]
        if value is not None and mode != "reference":
            raise ValueError(f'reference is for mode "reference", not {mode!r}')
        return value


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = Field(
        default=None, ge=1, le=4096, description="default: min(16, the model's limit)"
    )
    top_k: int | None = Field(default=None, ge=0, le=1000)
    top_p: float | None = Field(default=None, gt=0, le=1)
    num_beams: int = Field(default=1, ge=1, le=64)
    seed: int | None = Field(default=None, ge=0)
    do_sample: bool | None = Field(default=None, description="default: sample when top_k/top_p")
    steps: Literal["all", "none"] | int | list[int] = Field(
        default="all", description="which steps to explain: all, none, first N, or a list"
    )
    path: Literal["batched", "stepwise"] = Field(
        default="batched",
        description="batched: one sweep after decoding; stepwise: relevance as tokens appear",
    )


class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    relevance: Literal["inputs", "all"] | list[str] = Field(
        default="inputs", description="'inputs' (per token / pixel), 'all', or layer names"
    )
    encoding: Literal["base64", "json"] = "base64"
    dtype: Literal["float16", "float32"] = "float16"
    top_scores: int = Field(default=5, ge=0, le=50, description="top tokens per generation step")


class RunTaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._\-/]+$")
    task: TaskName = "auto"
    inputs: Inputs
    relevance: RelevanceParams = Field(default_factory=RelevanceParams)
    generation: GenerationParams = Field(default_factory=GenerationParams)
    output: OutputOptions = Field(default_factory=OutputOptions)
