-- Finds the events a command message caused (its AMQP message id is recorded as the
-- events' causation_id), so a command delivered twice runs once. HTTP requests record
-- no causation id: their events stay out of this index.
CREATE INDEX events_causation_id ON events ((metadata->>'causation_id'))
    WHERE metadata->>'causation_id' IS NOT NULL;
