-- Argo CD health check for moat.dev/SecureModelDeployment.
--
-- Reads only the Ready condition and observedGeneration, so new status fields or conditions never
-- change the verdict:
--   Healthy      Ready=True and the status describes the current generation
--   Degraded     Ready=False for a reason that needs a change (invalid spec, conflict, rejected
--                object, rollout past its progress deadline)
--   Progressing  anything else (not yet observed, rolling out, retrying)
--
-- Install: see examples/gitops/README.md (resource.customizations.health.moat.dev_SecureModelDeployment).
local hs = {}
local needs_change = {
  InvalidSpec = true,
  Conflict = true,
  Rejected = true,
  ProgressDeadlineExceeded = true,
}

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for Moat to observe the SecureModelDeployment"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for Moat to observe the latest spec"
  return hs
end

local ready = nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
elseif needs_change[ready.reason] then
  hs.status = "Degraded"
  hs.message = ready.message or ready.reason
else
  hs.status = "Progressing"
  hs.message = ready.message or "Rolling out"
end
return hs
