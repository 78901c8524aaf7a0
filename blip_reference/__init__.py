"""Optional adapters to the Hugging Face transformers reference (a test-only dependency).

Kept outside ``blip_core``, ``backends`` and ``converters`` so that none of the library packages
ever imports transformers; ``blip parity --reference transformers`` loads this package on request.
"""
