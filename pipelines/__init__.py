"""Model pipelines (imported as ``stream_runtime.pipelines``)."""
