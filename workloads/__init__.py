"""The platform's own programs, run by selfheal as units: each is ``python -m workloads.<name>``.

``generate`` lands telemetry batches with realistic dirt; ``etl`` (pyspark)
cleans and aggregates them into Parquet committed atomically with a manifest;
``train`` fits and publishes a versioned model unless it is worse than the
current one; ``serve`` answers predictions and reloads published models.
They import only the kernel (``selfheal``); Spark and Parquet come with the
``spark`` extra.
"""
