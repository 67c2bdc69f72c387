"""rz's request types to and from the rz.v1 messages: GenerationOptions fields are RequestOptions'
flat names, and each FINISH_REASON_<NAME> is FinishReason.<NAME>."""

from rz.api.v1 import inference_pb2 as pb
from rz.request import FLAT_OPTIONS, FinishReason, RequestOptions

_PREFIX = "FINISH_REASON_"


def options_message(options: dict) -> pb.GenerationOptions:
    """GenerationOptions from flat request options (RequestOptions.from_flat's names); None means unset."""
    given = {name: value for name, value in options.items() if value is not None}
    # Normalized (one stop string as a tuple of one) and checked as rz.LLM does: an unknown name fails here.
    flat = RequestOptions.from_flat(**given).flat()
    return pb.GenerationOptions(**{name: flat[name] for name in given})


def request_options(message: pb.GenerationOptions) -> RequestOptions:
    """The RequestOptions a GenerationOptions asks for: a field left unset takes RequestOptions' default."""
    fields = message.DESCRIPTOR.fields_by_name
    given = {name: getattr(message, name) for name in FLAT_OPTIONS if not fields[name].has_presence or message.HasField(name)}
    repeated = {name: list(value) for name, value in given.items() if not isinstance(value, (bool, int, float, str))}
    return RequestOptions.from_flat(**given | repeated)


def finish_reason_value(reason: FinishReason) -> int:
    return pb.FinishReason.Value(_PREFIX + reason.name)


def finish_reason(value: int) -> FinishReason | None:
    """The FinishReason of a message's finish_reason; None while unfinished (FINISH_REASON_UNSPECIFIED)."""
    name = pb.FinishReason.Name(value).removeprefix(_PREFIX)
    return None if name == "UNSPECIFIED" else FinishReason[name]
