-- What each provider's CLI changed in a run's workspace: a JSON map of
-- provider to a diff sealed to the user's vault public key (base64), like
-- the answers; the store never holds code in the clear.
ALTER TABLE runs ADD COLUMN diffs TEXT;
