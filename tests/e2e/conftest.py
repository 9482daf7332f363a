from tests.integration.conftest import kafka_bootstrap, kafka_topic

__all__ = ["kafka_bootstrap", "kafka_topic"]
