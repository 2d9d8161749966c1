-- A run's prompt, sealed to the user's vault public key like its answers
-- (the history shows and searches it in the user's unlocked tab; the
-- store never holds it in the clear).
ALTER TABLE runs ADD COLUMN prompt TEXT;
