"""The engine's errors: what a caller of Engine.submit, DecoderWeights or Adapter may catch."""


class EngineError(Exception):
    pass


class UnsupportedModel(EngineError):
    pass


class EngineClosed(EngineError):
    """The weights were unloaded after the caller got them: load the version again."""


class QueueFull(EngineError):
    def __init__(self, retry_after, *, reason="the generation queue is full"):
        super().__init__(f"{reason}; retry in {retry_after} s")
        self.retry_after = retry_after
