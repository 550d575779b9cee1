package org.researchflow.hapi;

import org.springframework.boot.context.properties.ConfigurationProperties;

/**
 * The {@code hapi.fhir.*} settings this server reads (application.yaml, environment, or
 * {@code --hapi.fhir...=} arguments). The names follow the HAPI JPA starter's, so a
 * configuration written for one reads the same here.
 */
@ConfigurationProperties(prefix = "hapi.fhir")
public class HapiProperties {

	/** Only R4 is served: the receiver, the validation gate and the views are written for it. */
	private String fhirVersion = "R4";

	private final Subscription subscription = new Subscription();

	/** Milliseconds an identical search reuses its cached results (HAPI's default 60000). */
	private long reuseCachedSearchResultsMillis = 60_000L;

	public String getFhirVersion() {
		return fhirVersion;
	}

	public void setFhirVersion(String fhirVersion) {
		this.fhirVersion = fhirVersion;
	}

	public Subscription getSubscription() {
		return subscription;
	}

	public long getReuseCachedSearchResultsMillis() {
		return reuseCachedSearchResultsMillis;
	}

	public void setReuseCachedSearchResultsMillis(long reuseCachedSearchResultsMillis) {
		this.reuseCachedSearchResultsMillis = reuseCachedSearchResultsMillis;
	}

	/** {@code hapi.fhir.subscription.*}. */
	public static class Subscription {

		/** Rest-hook channels (off unless asked for, as in HAPI's starter). */
		private boolean resthookEnabled = false;

		/** Queue each change for matching in its own transaction instead of a 5 s sweep. */
		private boolean immediatelyQueued = false;

		/** Websocket channels: ResearchFlow has no websocket subscriber. */
		private boolean websocketEnabled = false;

		public boolean isResthookEnabled() {
			return resthookEnabled;
		}

		public void setResthookEnabled(boolean resthookEnabled) {
			this.resthookEnabled = resthookEnabled;
		}

		public boolean isImmediatelyQueued() {
			return immediatelyQueued;
		}

		public void setImmediatelyQueued(boolean immediatelyQueued) {
			this.immediatelyQueued = immediatelyQueued;
		}

		public boolean isWebsocketEnabled() {
			return websocketEnabled;
		}

		public void setWebsocketEnabled(boolean websocketEnabled) {
			this.websocketEnabled = websocketEnabled;
		}
	}
}
