"""glassbox.elastic: Pollux (gradient noise scale, throughput and goodput models, batch/LR scaling, elastic
resizing, cluster scheduler). Not built yet; it plugs into the trainer's batch plan and callbacks."""
