"""HTML reports a person opens in a browser: a training run's and a sweep's."""
