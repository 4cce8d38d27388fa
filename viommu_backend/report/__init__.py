"""HTML reports of boots and matrix runs (``--report DIR``): what a run collects from the
backend while the guest runs (``collect``), the plots made from it (``plots``, matplotlib)
and the pages around them (``html``)."""
