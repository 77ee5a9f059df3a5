"""The engine's errors: what a caller of Engine.submit, DecoderWeights or Adapter may catch."""


class EngineError(Exception):
    pass


class UnsupportedModel(EngineError):
    pass


class EngineClosed(EngineError):
    """The weights were unloaded after the caller got them: load the version again."""


class PromptTooLong(EngineError):
    """The prompt and max_new_tokens do not fit the context: the caller's input, not a fault. The
    one check of the context length (Engine.submit), whoever calls."""


class QueueFull(EngineError):
    def __init__(self, retry_after, *, reason="the generation queue is full"):
        super().__init__(f"{reason}; retry in {retry_after} s")
        self.retry_after = retry_after
