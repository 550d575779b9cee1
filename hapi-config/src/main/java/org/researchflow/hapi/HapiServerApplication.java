package org.researchflow.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration;
import org.springframework.boot.autoconfigure.flyway.FlywayAutoConfiguration;
import org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration;
import org.springframework.boot.context.properties.EnableConfigurationProperties;
import org.springframework.context.annotation.Import;

/**
 * ResearchFlow's local HAPI FHIR JPA server (FHIR R4, PostgreSQL, rest-hook Subscriptions).
 *
 * <p>Everything FHIR comes from HAPI's own Spring configurations, imported here: the R4 JPA
 * server ({@link JpaR4Config}, {@link HapiJpaConfig}), the subscription pipeline (submitter,
 * matcher/deliverer, in-memory channels) and batch2 (which the JPA server needs for reindexing
 * and bulk jobs). {@link ServerConfig} supplies what HAPI leaves to the application: the
 * storage and subscription settings, the entity manager on the data source, and the
 * {@code RestfulServer} servlet on {@code /fhir/*}.
 */
// Flyway comes with HAPI's schema migrator but is not how this server creates its schema
// (Hibernate does, see application.yaml); Elasticsearch and Thymeleaf are unused HAPI extras.
@SpringBootApplication(
		exclude = {
			FlywayAutoConfiguration.class,
			ElasticsearchRestClientAutoConfiguration.class,
			ThymeleafAutoConfiguration.class
		})
@EnableConfigurationProperties(HapiProperties.class)
@Import({
	ThreadPoolFactoryConfig.class,
	JpaR4Config.class,
	HapiJpaConfig.class,
	SubscriptionSubmitterConfig.class,
	SubscriptionProcessorConfig.class,
	SubscriptionChannelConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	ServerConfig.class
})
public class HapiServerApplication {

	public static void main(String[] args) {
		SpringApplication.run(HapiServerApplication.class, args);
	}
}
