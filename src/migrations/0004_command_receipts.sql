-- Commands received over AMQP, by message id, written in the command's own transaction:
-- a message sent again (redelivered after a lost ack, or retried by its sender) finds
-- its receipt and is answered, not run again, even if it changed nothing (and so
-- recorded no event), and even while a copy runs in another process (the second
-- insert of one id waits for the first transaction). A command refused or rolled back
-- leaves no receipt: sent again, it runs. Not a read model: replay leaves it alone.
CREATE TABLE command_receipts (
    message_id  text        PRIMARY KEY,
    command     text        NOT NULL,
    -- SHA-256 of the message body: one id names one command as sent.
    body_sha256 text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
