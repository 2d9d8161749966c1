-- What each provider's CLI changed in a run's workspace: a JSON map of
-- provider to a diff sealed to the user's vault public key (base64), like
-- the answers (the store never holds code in the clear); and which
-- providers have one, so a list of runs never reads the diffs themselves.
ALTER TABLE runs ADD COLUMN diffs TEXT;
ALTER TABLE runs ADD COLUMN diff_providers TEXT;
