"""The ``gradlora`` command-line application: ``gradlora train``, ``gradlora bench`` and
``gradlora methods`` (``main.main``). It imports the library; the library never imports it."""
