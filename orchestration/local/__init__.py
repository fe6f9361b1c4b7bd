"""Running the unchanged state machine on a laptop: moto server mode, ECS tasks as local processes."""
